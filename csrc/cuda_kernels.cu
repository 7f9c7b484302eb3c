// CUDA kernels of the cspmirror_ext operators (same host logic as the CPU, in common.h). Elementwise kernels
// use grid-stride loops with 32-bit index math when every offset fits (64-bit otherwise); per-channel
// reductions write per-block partials over a partition fixed by the shape, reduced in a fixed order: no
// atomics, deterministic. fp16/bf16 compute in fp32.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.h"

namespace cspmirror {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kThreads = 256;
constexpr int kRowThreadsX = 32;                       // channels per block in channels_last reductions
constexpr int kRowThreadsY = kThreads / kRowThreadsX;  // rows walked in parallel
constexpr int64_t kElementsPerReduceBlock = 8192;
constexpr int64_t kMaxGridY = 65535;

struct DevExp {
  __host__ __device__ __forceinline__ float operator()(float v) const { return expf(v); }
  __host__ __device__ __forceinline__ double operator()(double v) const { return exp(v); }
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename A>
struct Pair {
  A a, b;
};

int64_t blocks_for(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 16));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

int64_t max_offset(const View4& v) {
  int64_t m = 0;
  for (int d = 0; d < 4; ++d) m += (v.size[d] - 1) * std::abs(v.stride[d]);
  return m;
}

constexpr int64_t kInt32Limit = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------------------------
// mirror_split / mirror_fuse: one thread per destination element, in the destination's memory order.
// ---------------------------------------------------------------------------------------------------------

template <typename I>
struct MirrorParams {
  I size[4];  // destination, logical [N, C, H, W]
  I src_stride[4];
  I dst_stride[4];
  I numel, batch, length, width;
  int axis;
  bool mirror, nhwc;
};

template <typename I>
MirrorParams<I> mirror_params(const View4& src, const View4& dst, const MirrorGeometry& g, int64_t batch) {
  MirrorParams<I> p;
  int64_t numel = 1;
  for (int d = 0; d < 4; ++d) {
    p.size[d] = static_cast<I>(dst.size[d]);
    p.src_stride[d] = static_cast<I>(src.stride[d]);
    p.dst_stride[d] = static_cast<I>(dst.stride[d]);
    numel *= dst.size[d];
  }
  p.numel = static_cast<I>(numel);
  p.batch = static_cast<I>(batch);
  p.length = static_cast<I>(g.length);
  p.width = static_cast<I>(g.width);
  p.axis = g.axis;
  p.mirror = g.mirror;
  p.nhwc = g.nhwc;
  return p;
}

template <typename I>
__device__ __forceinline__ void unravel(I i, const MirrorParams<I>& p, I idx[4]) {
  if (p.nhwc) {
    idx[1] = i % p.size[1];
    i /= p.size[1];
    idx[3] = i % p.size[3];
    i /= p.size[3];
    idx[2] = i % p.size[2];
    idx[0] = i / p.size[2];
  } else {
    idx[3] = i % p.size[3];
    i /= p.size[3];
    idx[2] = i % p.size[2];
    i /= p.size[2];
    idx[1] = i % p.size[1];
    idx[0] = i / p.size[1];
  }
}

template <typename I>
__device__ __forceinline__ I dot(const I idx[4], const I stride[4]) {
  return idx[0] * stride[0] + idx[1] * stride[1] + idx[2] * stride[2] + idx[3] * stride[3];
}

template <typename T, typename I>
__global__ void split_kernel(const T* __restrict__ src, T* __restrict__ dst, MirrorParams<I> p, acc_t<T> scale) {
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < p.numel; i += blockDim.x * gridDim.x) {
    I idx[4];
    unravel(i, p, idx);
    const bool second = idx[0] >= p.batch;
    const I j = idx[p.axis];
    const I l = !second ? j : (p.mirror ? p.length - 1 - j : p.length - p.width + j);
    I sidx[4] = {second ? idx[0] - p.batch : idx[0], idx[1], idx[2], idx[3]};
    sidx[p.axis] = l;
    T v = src[dot(sidx, p.src_stride)];
    if (scale != acc_t<T>(1) && l + p.width >= p.length && l < p.width) {
      v = static_cast<T>(static_cast<acc_t<T>>(v) * scale);
    }
    dst[dot(idx, p.dst_stride)] = v;
  }
}

// out = 0 + a (+ b), rounded once, as the reference's zeros + z1 + z2; "mean" halves the rounded overlap sum.
template <typename T, typename I>
__global__ void fuse_kernel(const T* __restrict__ src, T* __restrict__ dst, MirrorParams<I> p, bool mean) {
  using A = acc_t<T>;
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < p.numel; i += blockDim.x * gridDim.x) {
    I idx[4];
    unravel(i, p, idx);
    const I l = idx[p.axis];
    const bool has_a = l < p.width, has_b = l + p.width >= p.length;
    A acc = A(0);
    if (has_a) acc = acc + static_cast<A>(src[dot(idx, p.src_stride)]);
    if (has_b) {
      I bidx[4] = {idx[0] + p.batch, idx[1], idx[2], idx[3]};
      bidx[p.axis] = p.mirror ? p.length - 1 - l : l + p.width - p.length;
      acc = acc + static_cast<A>(src[dot(bidx, p.src_stride)]);
    }
    T r = static_cast<T>(acc);
    if (mean && has_a && has_b) r = static_cast<T>(static_cast<A>(r) * A(0.5));
    dst[dot(idx, p.dst_stride)] = r;
  }
}

template <typename Launch>
void with_index_type(const View4& src, const View4& dst, const Launch& launch) {
  int64_t numel = 1;
  for (int d = 0; d < 4; ++d) numel *= dst.size[d];
  if (numel <= kInt32Limit && max_offset(src) <= kInt32Limit && max_offset(dst) <= kInt32Limit) {
    launch(uint32_t{0}, numel);
  } else {
    launch(int64_t{0}, numel);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel reductions of two terms f(c, offset): NCHW planes ([C, G] blocks, each a fixed chunk of the
// channel's N*S elements) or channels_last rows ([C/32, G] blocks of 32 channels x a fixed run of rows).
// Partials [G, 2, C] are summed per channel in order of g, in fp64.
// ---------------------------------------------------------------------------------------------------------

template <typename A, typename F>
__global__ void reduce_planes_kernel(F f, int64_t N, int64_t C, int64_t S, int64_t chunk, A* partial) {
  __shared__ A sa[kThreads], sb[kThreads];
  const int64_t g = blockIdx.x, M = N * S;
  const int t = threadIdx.x;
  const int64_t dn = blockDim.x / S, ds = blockDim.x % S;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const int64_t end = imin(M, (g + 1) * chunk);
    int64_t m = g * chunk + t;
    int64_t n = m / S, s = m - n * S;
    A a = A(0), b = A(0);
    for (; m < end; m += blockDim.x) {
      const Pair<A> v = f(c, (n * C + c) * S + s);
      a += v.a;
      b += v.b;
      n += dn;
      s += ds;
      if (s >= S) {
        s -= S;
        ++n;
      }
    }
    sa[t] = a;
    sb[t] = b;
    __syncthreads();
    for (int k = kThreads / 2; k > 0; k >>= 1) {
      if (t < k) {
        sa[t] += sa[t + k];
        sb[t] += sb[t + k];
      }
      __syncthreads();
    }
    if (t == 0) {
      partial[(2 * g) * C + c] = sa[0];
      partial[(2 * g + 1) * C + c] = sb[0];
    }
    __syncthreads();
  }
}

template <typename A, typename F>
__global__ void reduce_rows_kernel(F f, int64_t rows, int64_t C, int64_t rows_per_block, A* partial) {
  __shared__ A sa[kRowThreadsY][kRowThreadsX + 1], sb[kRowThreadsY][kRowThreadsX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * kRowThreadsX + tx, g = blockIdx.y;
  const int64_t r_end = imin(rows, (g + 1) * rows_per_block);
  A a = A(0), b = A(0);
  if (c < C) {
    for (int64_t r = g * rows_per_block + ty; r < r_end; r += kRowThreadsY) {
      const Pair<A> v = f(c, r * C + c);
      a += v.a;
      b += v.b;
    }
  }
  sa[ty][tx] = a;
  sb[ty][tx] = b;
  __syncthreads();
  for (int k = kRowThreadsY / 2; k > 0; k >>= 1) {
    if (ty < k) {
      sa[ty][tx] += sa[ty + k][tx];
      sb[ty][tx] += sb[ty + k][tx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    partial[(2 * g) * C + c] = sa[0][tx];
    partial[(2 * g + 1) * C + c] = sb[0][tx];
  }
}

// Launches the reduction of f over x-like tensors of geometry g; returns the partials [G, 2, C].
template <typename A, typename F>
at::Tensor reduce_channels(const ChannelGeometry& g, const F& f, const at::TensorOptions& acc_options) {
  if (!g.nhwc) {
    const int64_t M = g.count();
    const int64_t G = std::max<int64_t>(1, std::min<int64_t>((M + kElementsPerReduceBlock - 1) /
                                                                  kElementsPerReduceBlock, 1024));
    const int64_t chunk = (M + G - 1) / G;
    at::Tensor partial = at::empty({G, 2, g.C}, acc_options);
    const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(std::min<int64_t>(g.C, kMaxGridY)));
    reduce_planes_kernel<A><<<grid, kThreads, 0, stream()>>>(f, g.N, g.C, g.S, chunk, partial.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partial;
  }
  const int64_t rows = g.count();
  const int64_t target = std::max<int64_t>(kElementsPerReduceBlock / kRowThreadsX, (rows + kMaxGridY - 1) / kMaxGridY);
  const int64_t G = (rows + target - 1) / target;
  at::Tensor partial = at::empty({G, 2, g.C}, acc_options);
  const dim3 grid(static_cast<unsigned>((g.C + kRowThreadsX - 1) / kRowThreadsX), static_cast<unsigned>(G));
  const dim3 block(kRowThreadsX, kRowThreadsY);
  reduce_rows_kernel<A><<<grid, block, 0, stream()>>>(f, rows, g.C, target, partial.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

// Sums about a per-channel shift (its first element), so E[d^2] - E[d]^2 does not cancel when |mean| >> std.
template <typename T>
struct StatsTerm {
  const T* __restrict__ x;
  int64_t shift_stride;
  __device__ __forceinline__ Pair<acc_t<T>> operator()(int64_t c, int64_t i) const {
    using A = acc_t<T>;
    const A d = static_cast<A>(x[i]) - stats_shift(static_cast<A>(x[c * shift_stride]));
    return {d, d * d};
  }
};

// gz = gy * mish'(z) and gz * (x - mean), z recomputed from x and the [5, C] params (common.h).
template <typename T>
struct GradTerm {
  const T* __restrict__ x;
  const T* __restrict__ gy;
  const acc_t<T>* __restrict__ params;
  int64_t C;
  __device__ __forceinline__ Pair<acc_t<T>> operator()(int64_t c, int64_t i) const {
    using A = acc_t<T>;
    const A xm = (static_cast<A>(x[i]) - params[c]) - params[C + c];
    const A gz = static_cast<A>(gy[i]) * mish_derivative(xm * params[2 * C + c] + params[3 * C + c], DevExp{});
    return {gz, gz * xm};
  }
};

template <typename T>
__global__ void stats_finalize_kernel(const acc_t<T>* partial, int64_t G, int64_t C, double count, const T* x,
                                      int64_t shift_stride, double* mean, double* var) {
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
    double s1 = 0, s2 = 0;
    for (int64_t g = 0; g < G; ++g) {
      s1 += static_cast<double>(partial[(2 * g) * C + c]);
      s2 += static_cast<double>(partial[(2 * g + 1) * C + c]);
    }
    const double d = s1 / count;
    mean[c] = static_cast<double>(stats_shift(static_cast<acc_t<T>>(x[c * shift_stride]))) + d;
    var[c] = clamp_nonnegative(s2 / count - d * d);
  }
}

// k [2, C]: gx = scale * gz + k0 - (x - mean) * k2; gw = rstd * sum gz (x - mean), gb = sum gz.
template <typename A>
__global__ void grad_finalize_kernel(const A* partial, int64_t G, int64_t C, double count, const A* params,
                                     bool training, A* k, A* gw, A* gb) {
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
    double s1 = 0, s2 = 0;
    for (int64_t g = 0; g < G; ++g) {
      s1 += static_cast<double>(partial[(2 * g) * C + c]);
      s2 += static_cast<double>(partial[(2 * g + 1) * C + c]);
    }
    const double scale = params[2 * C + c], rstd = params[4 * C + c];
    k[c] = static_cast<A>(training ? -scale * s1 / count : 0.0);
    k[C + c] = static_cast<A>(training ? scale * rstd * rstd * s2 / count : 0.0);
    if (gw != nullptr) {
      gw[c] = static_cast<A>(s2 * rstd);
      gb[c] = static_cast<A>(s1);
    }
  }
}

template <typename A>
__global__ void params_kernel(const double* mean, const double* var, const A* weight, const A* bias, double eps,
                              int64_t C, A* params) {
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
    const double rstd = 1.0 / sqrt(var[c] + eps);
    const A hi = static_cast<A>(mean[c]);
    params[c] = hi;
    params[C + c] = static_cast<A>(mean[c] - static_cast<double>(hi));
    params[2 * C + c] = static_cast<A>(weight ? static_cast<double>(weight[c]) * rstd : rstd);
    params[3 * C + c] = bias ? bias[c] : A(0);
    params[4 * C + c] = static_cast<A>(rstd);
  }
}

// nn.BatchNorm2d: running = momentum * batch + (1 - momentum) * running, with the unbiased variance.
template <typename R>
__global__ void running_stats_kernel(R* running_mean, R* running_var, const double* mean, const double* var,
                                     double momentum, double unbias, int64_t C) {
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
    running_mean[c] = static_cast<R>(momentum * mean[c] + (1.0 - momentum) * static_cast<double>(running_mean[c]));
    running_var[c] =
        static_cast<R>(momentum * var[c] * unbias + (1.0 - momentum) * static_cast<double>(running_var[c]));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise passes: i walks x (dense in the geometry's order); c and the out offset come from i.
// ---------------------------------------------------------------------------------------------------------

// Strides of a StridedView in the index type.
template <typename I>
struct Strides {
  I sN, sC, sP;
};

template <typename I>
struct ElementShape {
  I numel, C, S;
  Strides<I> out, residual;
  bool nhwc;
};

template <typename I>
__device__ __forceinline__ I offset_in(const Strides<I>& v, bool nhwc, I n, I c, I s, I pixel) {
  return nhwc ? pixel * v.sP + c : n * v.sN + c * v.sC + s;
}

// Element i of the dense x: its channel and its offsets in out and in the residual.
template <typename I>
__device__ __forceinline__ void locate(I i, const ElementShape<I>& e, I& c, I& out_offset, I& residual_offset) {
  I n = 0, s = 0, pixel = 0;
  if (e.nhwc) {
    pixel = i / e.C;
    c = i - pixel * e.C;
  } else {
    const I plane = i / e.S;
    n = plane / e.C;
    c = plane - n * e.C;
    s = i - plane * e.S;
  }
  out_offset = offset_in(e.out, e.nhwc, n, c, s, pixel);
  residual_offset = offset_in(e.residual, e.nhwc, n, c, s, pixel);
}

template <typename T, typename I>
__global__ void apply_kernel(const T* x, const acc_t<T>* __restrict__ params, const T* residual, T* out,
                             ElementShape<I> e) {
  using A = acc_t<T>;
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < e.numel; i += blockDim.x * gridDim.x) {
    I c, o, r;
    locate(i, e, c, o, r);
    A z = static_cast<A>(x[i]);
    if (params != nullptr) z = ((z - params[c]) - params[e.C + c]) * params[2 * e.C + c] + params[3 * e.C + c];
    A y = mish_forward(z, DevExp{});
    if (residual != nullptr) y += static_cast<A>(residual[r]);
    out[o] = static_cast<T>(y);
  }
}

template <typename T, typename I>
__global__ void grad_kernel(const T* __restrict__ x, const T* __restrict__ gy, const acc_t<T>* __restrict__ params,
                            const acc_t<T>* __restrict__ k, T* __restrict__ gx, ElementShape<I> e) {
  using A = acc_t<T>;
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < e.numel; i += blockDim.x * gridDim.x) {
    const I c = e.nhwc ? i % e.C : (i / e.S) % e.C;
    const A scale = params[2 * e.C + c];
    const A xm = (static_cast<A>(x[i]) - params[c]) - params[e.C + c];
    const A gz = static_cast<A>(gy[i]) * mish_derivative(xm * scale + params[3 * e.C + c], DevExp{});
    gx[i] = static_cast<T>(scale * gz + k[c] - xm * k[e.C + c]);
  }
}

template <typename I>
Strides<I> strides_of(const StridedView& v) {
  return {static_cast<I>(v.sN), static_cast<I>(v.sC), static_cast<I>(v.sP)};
}

template <typename I>
ElementShape<I> element_shape(const ChannelGeometry& g, const StridedView& out, const StridedView& residual) {
  return {static_cast<I>(g.N * g.C * g.S), static_cast<I>(g.C), static_cast<I>(g.S), strides_of<I>(out),
          strides_of<I>(residual), g.nhwc};
}

int64_t reach(const ChannelGeometry& g, const StridedView& v) {
  return g.nhwc ? (g.N * g.S - 1) * v.sP + g.C : (g.N - 1) * v.sN + (g.C - 1) * v.sC + g.S;
}

bool fits_int32(const ChannelGeometry& g, const StridedView& out, const StridedView& residual) {
  return g.N * g.C * g.S <= kInt32Limit && reach(g, out) <= kInt32Limit && reach(g, residual) <= kInt32Limit;
}

#define CSPM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor on_device_as(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : at::Tensor();
}

struct CudaKernels {
  static void split_part(const View4& src, const View4& dst, const MirrorGeometry& g, double scale,
                         at::ScalarType t) {
    CSPM_DISPATCH(t, "mirror_split_cuda", [&] {
      with_index_type(src, dst, [&](auto zero, int64_t numel) {
        using I = decltype(zero);
        split_kernel<scalar_t, I><<<blocks_for(numel), kThreads, 0, stream()>>>(
            reinterpret_cast<const scalar_t*>(src.data), reinterpret_cast<scalar_t*>(dst.data),
            mirror_params<I>(src, dst, g, src.size[0]), static_cast<acc_t<scalar_t>>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void fuse_part(const View4& src, const View4& dst, const MirrorGeometry& g, bool mean, at::ScalarType t) {
    CSPM_DISPATCH(t, "mirror_fuse_cuda", [&] {
      with_index_type(src, dst, [&](auto zero, int64_t numel) {
        using I = decltype(zero);
        fuse_kernel<scalar_t, I><<<blocks_for(numel), kThreads, 0, stream()>>>(
            reinterpret_cast<const scalar_t*>(src.data), reinterpret_cast<scalar_t*>(dst.data),
            mirror_params<I>(src, dst, g, dst.size[0]), mean);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static std::tuple<at::Tensor, at::Tensor> channel_stats(const ChannelGeometry& g, const at::Tensor& x) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto opts = x.options().dtype(at::kDouble);
    at::Tensor mean = new_output({g.C}, opts), var = new_output({g.C}, opts);
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_stats_cuda", [&] {
      using A = acc_t<scalar_t>;
      const int64_t shift_stride = g.nhwc ? 1 : g.S;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
      const at::Tensor partial = reduce_channels<A>(g, StatsTerm<scalar_t>{xp, shift_stride}, acc_opts);
      stats_finalize_kernel<scalar_t><<<blocks_for(g.C), kThreads, 0, stream()>>>(
          partial.const_data_ptr<A>(), partial.size(0), g.C, static_cast<double>(g.count()), xp, shift_stride,
          mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {mean, var};
  }

  static at::Tensor channel_params(const at::Tensor& mean, const at::Tensor& var, double eps,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                   at::ScalarType acc) {
    const c10::cuda::CUDAGuard guard(mean.device());
    const int64_t C = mean.numel();
    const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
    const at::Tensor w = on_device_as(weight, acc), b = on_device_as(bias, acc);
    at::Tensor params = at::empty({5, C}, mean.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "channel_params_cuda", [&] {
      params_kernel<scalar_t><<<blocks_for(C), kThreads, 0, stream()>>>(
          m.const_data_ptr<double>(), v.const_data_ptr<double>(),
          w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
          eps, C, params.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return params;
  }

  static void bn_apply(const ChannelGeometry& g, const at::Tensor& x, const at::Tensor& params,
                       const StridedView& residual, const StridedView& out) {
    const c10::cuda::CUDAGuard guard(x.device());
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_apply_cuda", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const A* pp = params.defined() ? params.const_data_ptr<A>() : nullptr;
      const scalar_t* rp = reinterpret_cast<const scalar_t*>(residual.data);
      scalar_t* op = reinterpret_cast<scalar_t*>(out.data);
      const int64_t numel = g.N * g.C * g.S;
      if (fits_int32(g, out, residual)) {
        apply_kernel<scalar_t, uint32_t><<<blocks_for(numel), kThreads, 0, stream()>>>(
            xp, pp, rp, op, element_shape<uint32_t>(g, out, residual));
      } else {
        apply_kernel<scalar_t, int64_t><<<blocks_for(numel), kThreads, 0, stream()>>>(
            xp, pp, rp, op, element_shape<int64_t>(g, out, residual));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bn_backward(const ChannelGeometry& g, const at::Tensor& gy, const at::Tensor& x,
                          const at::Tensor& params, bool training, const at::Tensor& gx, const at::Tensor& gw,
                          const at::Tensor& gb) {
    const c10::cuda::CUDAGuard guard(x.device());
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_backward_cuda", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
      const A* pp = params.const_data_ptr<A>();
      at::Tensor k = at::zeros({2, g.C}, params.options());
      if (training || gw.defined()) {
        const at::Tensor partial = reduce_channels<A>(g, GradTerm<scalar_t>{xp, gyp, pp, g.C}, params.options());
        grad_finalize_kernel<A><<<blocks_for(g.C), kThreads, 0, stream()>>>(
            partial.const_data_ptr<A>(), partial.size(0), g.C, static_cast<double>(g.count()), pp, training,
            k.mutable_data_ptr<A>(), gw.defined() ? gw.mutable_data_ptr<A>() : nullptr,
            gb.defined() ? gb.mutable_data_ptr<A>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const StridedView dense = dense_view(gx, g);
      const int64_t numel = g.N * g.C * g.S;
      scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
      if (fits_int32(g, dense, dense)) {
        grad_kernel<scalar_t, uint32_t><<<blocks_for(numel), kThreads, 0, stream()>>>(
            xp, gyp, pp, k.const_data_ptr<A>(), gxp, element_shape<uint32_t>(g, dense, dense));
      } else {
        grad_kernel<scalar_t, int64_t><<<blocks_for(numel), kThreads, 0, stream()>>>(
            xp, gyp, pp, k.const_data_ptr<A>(), gxp, element_shape<int64_t>(g, dense, dense));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                   const at::Tensor& var, double momentum, int64_t count) {
    const c10::cuda::CUDAGuard guard(mean.device());
    const at::ScalarType dtype = running_mean.scalar_type();
    const int64_t C = mean.numel();
    // In place when both running stats are dense and of one dtype (the usual fp32 buffers).
    const auto working = [&](const at::Tensor& t) { return t.to(dtype).contiguous(); };
    at::Tensor rm = working(running_mean), rv = working(running_var);
    const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
    CSPM_DISPATCH(dtype, "running_stats_cuda", [&] {
      running_stats_kernel<scalar_t><<<blocks_for(C), kThreads, 0, stream()>>>(
          rm.mutable_data_ptr<scalar_t>(), rv.mutable_data_ptr<scalar_t>(), m.const_data_ptr<double>(),
          v.const_data_ptr<double>(), momentum, static_cast<double>(count) / static_cast<double>(count - 1), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!rm.is_same(running_mean)) running_mean.copy_(rm);
    if (!rv.is_same(running_var)) running_var.copy_(rv);
  }
};

}  // namespace
}  // namespace cspmirror

TORCH_LIBRARY_IMPL(cspmirror_ext, CUDA, m) { cspmirror::register_ops<cspmirror::CudaKernels>(m); }
