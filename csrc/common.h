// Shared by the CPU and CUDA translation units: Mish math, tensor geometry, and the device-independent host
// side of every op (argument normalisation, output allocation). Each device supplies a `Kernels` struct with
// the static launchers listed above `register_ops`; the ops are templates over it, so the host logic is
// written once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define CSPM_HD __host__ __device__ __forceinline__
#else
#define CSPM_HD inline
#endif

namespace cspmirror {

// ---------------------------------------------------------------------------------------------------------
// Mish with one exp: tanh(softplus(v)) = n / (n + 2) with n = e^v (e^v + 2). Above 20, softplus(v) = v and
// tanh(v) rounds to 1 (torch's threshold), so mish(v) = v and mish'(v) = 1. `Exp` is the device's exp.
// ---------------------------------------------------------------------------------------------------------
// (Arithmetic first, then selects: branch-free bodies that compilers vectorize.)
template <typename T, typename Exp>
CSPM_HD T mish_forward(T v, const Exp& exp_fn) {
  const T e = exp_fn(v < T(20) ? v : T(20));
  const T n = e * (e + T(2));
  const T m = v * (n / (n + T(2)));
  return v > T(20) ? v : m;
}

// d mish / dv = t + v (1 - t^2) sigmoid(v) = (n d + 4 v e (e + 1)) / d^2 with d = n + 2 (one division; d^2
// stays below 6e34 for v <= 20, so fp32 does not overflow).
template <typename T, typename Exp>
CSPM_HD T mish_derivative(T v, const Exp& exp_fn) {
  const T e = exp_fn(v < T(20) ? v : T(20));
  const T n = e * (e + T(2));
  const T d = n + T(2);
  const T g = (n * d + T(4) * e * (e + T(1)) * v) / (d * d);  // (v last: 4 v overflows for v < -8.5e37, e is 0)
  return (v > T(20) ? T(1) : g) + (v - v);  // + (v - v): NaN at v = +-inf, as PyTorch's (inf * 0 in its formula)
}

// The shift about which a channel's batch statistics are summed: its first element, or 0 when that is inf or
// NaN (x - shift would then be NaN everywhere, where the mean of a channel holding +-inf is +-inf).
template <typename T>
CSPM_HD T stats_shift(T first) {
  return first - first == T(0) ? first : T(0);
}

// max(v, 0), NaN staying NaN (fmax(NaN, 0) is 0: a NaN batch variance would come out finite).
CSPM_HD double clamp_nonnegative(double v) { return v < 0.0 ? 0.0 : v; }

// ---------------------------------------------------------------------------------------------------------
// Geometry.
// ---------------------------------------------------------------------------------------------------------

// A 4-D strided view, logical order [N, C, H, W]; strides in elements.
struct View4 {
  char* data;
  int64_t size[4];
  int64_t stride[4];
};

// The split axis (2 = H, 3 = W), its full length L and the part width P.
struct MirrorGeometry {
  int axis;
  int64_t length;
  int64_t width;
  bool mirror;
  bool nhwc;  // memory order of both views: channels_last when true, NCHW otherwise
};

// x-like tensors of a per-channel op, dense in `nhwc` or NCHW order: [N, C, S] planes or [N*S, C] rows.
struct ChannelGeometry {
  bool nhwc;
  int64_t N, C, S;
  int64_t count() const { return N * S; }  // elements per channel
};

// An operand of a per-channel op seen through its strides (e.g. a channel slice of a larger buffer): element
// (n, c, s) at NCHW offset n*sN + c*sC + s, or pixel p's channel c at NHWC offset p*sP + c. data == nullptr:
// no operand (no residual).
struct StridedView {
  char* data;
  int64_t sN, sC, sP;
};

// Tests switch this on (op `set_poison_outputs`): every output the ops allocate starts as NaN, so an element a
// kernel forgets to write cannot pass a comparison by holding a stale correct value.
bool& poison_outputs();

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::Tensor new_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline bool is_channels_last(const at::Tensor& t) {
  // Matches the reference: channels_last only when it is not also plain contiguous.
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The output formats of the reference's bn_mish and conv_bn_mish, ATen's batch_norm and convolution rules
// (cspmirror/ops/reference.py: bn_memory_format, conv_memory_format, which the fake implementations use): they
// also count as channels_last an input strided like it without being dense, such as a channel slice of a
// channels_last buffer (Tensor::suggest_memory_format).
inline bool strided_like_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat bn_format(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return format_of(x);
  return strided_like_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::MemoryFormat conv_format(const at::Tensor& x, const at::Tensor& weight) {
  // On CUDA only cuDNN runs channels_last, and never float64 (ATen's cudnn_conv_suggest_memory_format)
  if (x.is_cuda() && (x.scalar_type() == at::kDouble || !at::globalContext().userEnabledCuDNN())) {
    return at::MemoryFormat::Contiguous;
  }
  const bool nhwc = strided_like_channels_last(x) || strided_like_channels_last(weight);
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// `t` itself when its dense dimension in `fmt` (W for NCHW, C for channels_last) has stride 1, as for a channel
// slice of a larger tensor: the mirror kernels read such views in place. Otherwise a dense copy.
inline at::Tensor unit_inner_stride(const at::Tensor& t, at::MemoryFormat fmt) {
  const int inner = fmt == at::MemoryFormat::ChannelsLast ? 1 : 3;
  return t.size(inner) == 1 || t.stride(inner) == 1 ? t : t.contiguous(fmt);
}

inline View4 view_of(const at::Tensor& t, int64_t channel_offset = 0, int64_t channels = -1) {
  View4 v;
  v.data = static_cast<char*>(t.data_ptr()) + channel_offset * t.stride(1) * t.element_size();
  for (int d = 0; d < 4; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  if (channels >= 0) v.size[1] = channels;
  return v;
}

inline ChannelGeometry channel_geometry(const at::Tensor& x, bool nhwc) {
  return {nhwc, x.size(0), x.size(1), x.size(2) * x.size(3)};
}

// `t` as a StridedView when its strides follow the geometry's order, so that the kernels read or write it in
// place; std::nullopt when it needs a dense copy. A written tensor must also not overlap itself, which the
// strides show for these layouts (at::has_internal_overlap answers "too hard" for any channel slice).
inline std::optional<StridedView> strided_view(const at::Tensor& t, const ChannelGeometry& g, bool written) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), S = H * W;
  const auto s = t.strides();
  char* data = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
  if (!g.nhwc) {
    // rows of S contiguous elements at n * s[0] + c * s[1]: disjoint when each stride clears what it steps over
    const bool disjoint = (C == 1 || s[1] >= S) && (N == 1 || s[0] >= (C - 1) * s[1] + S);
    if ((W == 1 || s[3] == 1) && (H == 1 || s[2] == W) && (!written || disjoint))
      return StridedView{data, s[0], s[1], 0};
    return std::nullopt;
  }
  const int64_t sp = W > 1 ? s[3] : (H > 1 ? s[2] / W : (N > 1 ? s[0] : C));
  const bool ok = (C == 1 || s[1] == 1) && (W == 1 || s[3] == sp) && (H == 1 || s[2] == W * sp) &&
                  (N == 1 || s[0] == H * W * sp);
  // pixels of C contiguous channels, sp apart
  if (ok && (!written || N * S == 1 || sp >= C)) return StridedView{data, 0, 0, sp};
  return std::nullopt;
}

// Whether writing `out` in place could change what is still to be read from `input`: they share memory and
// are not the very same view (an element read and then written by the same step is fine).
inline bool may_clobber(const at::Tensor& out, const at::Tensor& input) {
  if (!input.defined() || !out.storage().is_alias_of(input.storage())) return false;
  return !(out.data_ptr() == input.data_ptr() && out.sizes() == input.sizes() && out.strides() == input.strides());
}

inline StridedView dense_view(const at::Tensor& t, const ChannelGeometry& g) {
  return StridedView{static_cast<char*>(const_cast<void*>(t.const_data_ptr())), g.C * g.S, g.S, g.C};
}

inline int split_dim(int64_t axis) {
  TORCH_CHECK(axis == -1 || axis == -2 || axis == 2 || axis == 3, "axis must be -1 (W) or -2 (H), got ", axis);
  return axis < 0 ? static_cast<int>(axis + 4) : static_cast<int>(axis);
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor optional_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The registered operators are public (torch.ops.cspmirror_ext.*): they check what their kernels rely on, even
// though the Python wrappers validate first, so that a direct call errors instead of reading out of bounds.
inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be a floating-point tensor");
  TORCH_CHECK(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

// A per-channel [C] vector of x (weight, bias, mean, variance, running statistics).
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK(v.dim() == 1 && v.numel() == x.size(1), name, " must have shape [", x.size(1), "], got ",
              v.sizes());
  TORCH_CHECK(v.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", v.device());
}

// ---------------------------------------------------------------------------------------------------------
// mirror_split / mirror_fuse (SPEC §1.1, §1.2): the backward of each is the forward of the other.
// ---------------------------------------------------------------------------------------------------------

// Kernels::split_part(src [N, C_i, .., L] view, dst [2N, C_i, .., P] view, geometry, overlap scale, dtype):
// dst = the two parts of src; overlap columns multiplied by `scale` (0.5: adjoint of the "mean" fuse).
// Kernels::fuse_part(src [2N, C_i, .., P] view, dst [N, C_i, .., L] view, geometry, mean, dtype).

template <class K>
std::vector<at::Tensor> split_into(const at::Tensor& x, at::IntArrayRef channels, int64_t width, int64_t axis,
                                   bool mirror, double scale) {
  check_input(x, "x");
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const int dim = split_dim(axis);
  const int64_t length = x.size(dim);
  TORCH_CHECK(width >= (length + 1) / 2 && width <= length, "width ", width, " is not a split width of ", length);
  const at::MemoryFormat fmt = format_of(x);
  const at::Tensor xc = unit_inner_stride(x, fmt);
  const MirrorGeometry g{dim, length, width, mirror, fmt == at::MemoryFormat::ChannelsLast};
  int64_t total = 0;
  for (const int64_t c : channels) {
    TORCH_CHECK(c >= 0, "channels must not be negative, got ", channels);
    total += c;
  }
  TORCH_CHECK(total == x.size(1), "channels sum to ", total, " but the gradient has ", x.size(1));
  std::vector<at::Tensor> outs;
  int64_t c0 = 0;
  for (const int64_t c : channels) {
    auto shape = x.sizes().vec();
    shape[0] *= 2;
    shape[1] = c;
    shape[dim] = width;
    at::Tensor y = new_output(shape, x.options().memory_format(fmt));
    K::split_part(view_of(xc, c0, c), view_of(y), g, scale, x.scalar_type());
    outs.push_back(y);
    c0 += c;
  }
  return outs;
}

template <class K>
at::Tensor mirror_split_op(const at::Tensor& x, int64_t width, int64_t axis, bool mirror) {
  return split_into<K>(x, {x.size(1)}, width, axis, mirror, 1.0)[0];
}

template <class K>
std::vector<at::Tensor> mirror_fuse_backward_op(const at::Tensor& grad, at::IntArrayRef channels, int64_t width,
                                                int64_t axis, bool mirror, bool mean) {
  return split_into<K>(grad, channels, width, axis, mirror, mean ? 0.5 : 1.0);
}

template <class K>
at::Tensor mirror_fuse_op(at::TensorList parts, int64_t length, int64_t axis, bool mirror, bool mean) {
  TORCH_CHECK(!parts.empty(), "parts must not be empty");
  const at::Tensor& first = parts[0];
  check_input(first, "parts[0]");
  const at::OptionalDeviceGuard guard(at::device_of(first));
  const int dim = split_dim(axis);
  const int64_t width = first.size(dim);
  TORCH_CHECK(first.size(0) % 2 == 0, "parts must have an even batch (2N)");
  TORCH_CHECK(width >= (length + 1) / 2 && width <= length, "parts of width ", width, " cannot fuse to ", length);
  // channels_last when any part is (as the reference: a channels_last model's first part is a channel slice)
  const bool any_nhwc =
      std::any_of(parts.begin(), parts.end(), [](const at::Tensor& p) { return is_channels_last(p); });
  const at::MemoryFormat fmt = any_nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  int64_t channels = 0;
  for (const auto& p : parts) {
    TORCH_CHECK(p.dim() == 4 && p.size(0) == first.size(0) && p.size(2) == first.size(2) &&
                    p.size(3) == first.size(3),
                "every part must match parts[0] outside the channel axis");
    TORCH_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(),
                "every part must have parts[0]'s dtype and device");
    channels += p.size(1);
  }
  auto shape = first.sizes().vec();
  shape[0] /= 2;
  shape[1] = channels;
  shape[dim] = length;
  at::Tensor out = new_output(shape, first.options().memory_format(fmt));
  const MirrorGeometry g{dim, length, width, mirror, fmt == at::MemoryFormat::ChannelsLast};
  int64_t c0 = 0;
  for (const auto& p : parts) {
    const at::Tensor pc = unit_inner_stride(p, fmt);
    K::fuse_part(view_of(pc), view_of(out, c0, p.size(1)), g, mean, first.scalar_type());
    c0 += p.size(1);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// bn_mish (SPEC §3). Batch statistics are fp64 [C] (mean, biased variance). Per-channel parameters travel as
// one [5, C] tensor in the accumulation dtype, rows mean_hi, mean_lo, scale = weight * rstd, shift = bias,
// rstd, and the kernels compute mish(((x - mean_hi) - mean_lo) * scale + shift): the mean split in two fp32
// numbers keeps x - mean exact to fp32 rounding even when |mean| >> std.
// Kernels::channel_stats(g, x) -> (mean, biased var), fp64 [C];
// Kernels::channel_params(mean, var, eps, w, b, accumulation dtype) -> [5, C];
// Kernels::bn_apply(g, x, params or undefined (identity), residual view (data null: none), out view);
// Kernels::bn_backward(g, gy, x, params, training, gx, gw, gb) (gw, gb undefined: not wanted);
// Kernels::update_running_stats(running_mean, running_var, mean, var, momentum, count).
// ---------------------------------------------------------------------------------------------------------

template <class K>
at::Tensor params_for(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  check_channel_vector(mean, "mean", x);
  check_channel_vector(var, "var", x);
  if (weight.has_value()) check_channel_vector(*weight, "weight", x);
  if (bias.has_value()) check_channel_vector(*bias, "bias", x);
  return K::channel_params(mean, var, eps, weight, bias, acc_type(x.scalar_type()));
}

struct Prepared {
  ChannelGeometry g;
  at::Tensor x;              // contiguous in the geometry's order
  at::Tensor residual;       // read in place when its strides allow (a channel slice), else a dense copy
  StridedView residual_view;  // data == nullptr: no residual
};

inline Prepared prepare(const at::Tensor& x, const std::optional<at::Tensor>& residual) {
  check_input(x, "x");
  const at::MemoryFormat fmt = bn_format(x);
  Prepared p{channel_geometry(x, fmt == at::MemoryFormat::ChannelsLast), x.contiguous(fmt), at::Tensor(),
             StridedView{nullptr, 0, 0, 0}};
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                "residual must have x's dtype and device");
    const auto view = strided_view(*residual, p.g, false);
    p.residual = view ? *residual : residual->contiguous(fmt);
    p.residual_view = view ? *view : dense_view(p.residual, p.g);
  }
  return p;
}

// Applies `params` to p.x and writes into `out` (in place when its strides allow, else via a temporary).
template <class K>
void apply_into(const Prepared& p, const at::Tensor& params, const at::Tensor& out) {
  TORCH_CHECK(out.sizes() == p.x.sizes(), "out must have shape ", p.x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == p.x.scalar_type() && out.device() == p.x.device(),
              "out must have x's dtype and device");
  if (!may_clobber(out, p.x) && !may_clobber(out, p.residual)) {
    if (const auto view = strided_view(out, p.g, true)) {
      K::bn_apply(p.g, p.x, params, p.residual_view, *view);
      return;
    }
  }
  at::Tensor tmp = new_output_like(p.x);
  K::bn_apply(p.g, p.x, params, p.residual_view, dense_view(tmp, p.g));
  out.copy_(tmp);
}

template <class K>
at::Tensor apply_new(const Prepared& p, const at::Tensor& params) {
  at::Tensor y = new_output_like(p.x);
  K::bn_apply(p.g, p.x, params, p.residual_view, dense_view(y, p.g));
  return y;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_mish_train_op(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, const std::optional<at::Tensor>& residual) {
  const Prepared p = prepare(x, residual);
  auto [mean, var] = K::channel_stats(p.g, p.x);
  const at::Tensor params = params_for<K>(x, mean, var, eps, weight, bias);
  return {apply_new<K>(p, params), mean, var};
}

template <class K>
std::tuple<at::Tensor, at::Tensor> bn_mish_train_out_op(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const Prepared p = prepare(x, residual);
  auto [mean, var] = K::channel_stats(p.g, p.x);
  const at::Tensor params = params_for<K>(x, mean, var, eps, weight, bias);
  apply_into<K>(p, params, out);
  return {mean, var};
}

template <class K>
at::Tensor bn_mish_eval_op(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps, const std::optional<at::Tensor>& residual) {
  const Prepared p = prepare(x, residual);
  const at::Tensor params = params_for<K>(x, running_mean, running_var, eps, weight, bias);
  return apply_new<K>(p, params);
}

template <class K>
void bn_mish_eval_out_op(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                         const at::Tensor& running_var, double eps, const std::optional<at::Tensor>& residual,
                         at::Tensor& out) {
  const Prepared p = prepare(x, residual);
  const at::Tensor params = params_for<K>(x, running_mean, running_var, eps, weight, bias);
  apply_into<K>(p, params, out);
}

// Returns (grad_x, grad_weight, grad_bias); the parameter grads are [C] in the accumulation dtype, or empty
// [0] tensors when `param_grads` is false. `mean`, `var`: the batch stats (training) or the running stats.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_mish_backward_op(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    bool training, bool param_grads) {
  const Prepared p = prepare(x, std::nullopt);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must have x's shape and dtype");
  const at::Tensor gy = grad_y.contiguous(format_of(p.x));
  const at::Tensor params = params_for<K>(x, mean, var, eps, weight, bias);
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor gx = new_output_like(p.x);
  at::Tensor gw = new_output({param_grads ? p.g.C : 0}, acc_opts);
  at::Tensor gb = new_output({param_grads ? p.g.C : 0}, acc_opts);
  K::bn_backward(p.g, gy, p.x, params, training, gx, param_grads ? gw : at::Tensor(),
                 param_grads ? gb : at::Tensor());
  return {gx, gw, gb};
}

template <class K>
void bn_update_running_stats_op(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                const at::Tensor& var, double momentum, int64_t count) {
  TORCH_CHECK(count > 1, "running stats need more than one value per channel, got ", count);
  TORCH_CHECK(running_mean.numel() == mean.numel() && running_var.numel() == var.numel(),
              "running stats and batch stats must have the same number of channels");
  TORCH_CHECK(running_mean.device() == mean.device() && running_var.device() == mean.device() &&
                  var.device() == mean.device(),
              "running stats and batch stats must be on one device");
  K::update_running_stats(running_mean, running_var, mean, var, momentum, count);
}

// ---------------------------------------------------------------------------------------------------------
// conv_bn_mish (inference): ATen's convolution (oneDNN / cuDNN) with BN already folded into weight and bias,
// then one pass of mish (+ residual) in place or into `out`.
// ---------------------------------------------------------------------------------------------------------

inline at::Tensor conv_pre_activation(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t stride) {
  check_input(x, "x");
  check_input(weight, "weight");
  const int64_t pad = weight.size(3) / 2;
  at::Tensor y = at::conv2d(x, weight, bias, {stride, stride}, {pad, pad});
  return y.contiguous(conv_format(x, weight));  // already so (ATen's rule): a no-op
}

template <class K>
at::Tensor conv_bn_mish_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t stride, const std::optional<at::Tensor>& residual) {
  const Prepared p = prepare(conv_pre_activation(x, weight, bias, stride), residual);
  K::bn_apply(p.g, p.x, at::Tensor(), p.residual_view, dense_view(p.x, p.g));  // in place
  return p.x;
}

template <class K>
void conv_bn_mish_out_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const Prepared p = prepare(conv_pre_activation(x, weight, bias, stride), residual);
  apply_into<K>(p, at::Tensor(), out);
}

template <class K>
void register_ops(torch::Library& m) {
  m.impl("mirror_split", TORCH_FN(mirror_split_op<K>));
  m.impl("mirror_fuse", TORCH_FN(mirror_fuse_op<K>));
  m.impl("mirror_fuse_backward", TORCH_FN(mirror_fuse_backward_op<K>));
  m.impl("bn_mish_train", TORCH_FN(bn_mish_train_op<K>));
  m.impl("bn_mish_train_out", TORCH_FN(bn_mish_train_out_op<K>));
  m.impl("bn_mish_eval", TORCH_FN(bn_mish_eval_op<K>));
  m.impl("bn_mish_eval_out", TORCH_FN(bn_mish_eval_out_op<K>));
  m.impl("bn_mish_backward", TORCH_FN(bn_mish_backward_op<K>));
  m.impl("bn_update_running_stats", TORCH_FN(bn_update_running_stats_op<K>));
  m.impl("conv_bn_mish", TORCH_FN(conv_bn_mish_op<K>));
  m.impl("conv_bn_mish_out", TORCH_FN(conv_bn_mish_out_op<K>));
}

}  // namespace cspmirror
