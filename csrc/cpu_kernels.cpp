// CPU kernels of the cspmirror_ext operators: at::parallel_for over rows or planes, one pass per op, inner
// loops over a dense dimension written so that the compiler vectorizes them (no intrinsics: the same source
// builds for any ISA; the build adds AVX2/FMA flags where the build machine has them). fp16/bf16 compute in
// fp32, fp64 in fp64. Reductions use a partition fixed by the shape, never by the thread count, so results
// are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace cspmirror {
namespace {

constexpr int64_t kGrainElements = 32768;  // about this many elements per parallel task

template <typename T>
using acc_t = at::opmath_type<T>;

// exp for fp32 (Cephes expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial, about 1 ulp), in plain
// arithmetic so that loops calling it vectorize. The polynomial runs on [-87, 88], where 2^n stays normal;
// below -87 the result is flushed to 0 (expf is subnormal there, then 0), so that mish(v) -> -0 and
// mish(-inf) = -inf * 0 = NaN as in the reference; the Mish callers clamp at 20 above.
inline float exp_poly(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : (x_in > 88.0f ? 88.0f : x_in);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound rounds x to an integer in the low bits
  const float shifted = x * 1.44269504088896341f + kRound;
  const float fn = shifted - kRound;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const int32_t n = bits - 0x4B400000;  // the bits of kRound
  float g = x - fn * 0.693359375f;
  g = g - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * g + 1.3981999507e-3f;
  p = p * g + 8.3334519073e-3f;
  p = p * g + 4.1665795894e-2f;
  p = p * g + 1.6666665459e-1f;
  p = p * g + 5.0000001201e-1f;
  p = p * g * g + g + 1.0f;
  const int32_t scale_bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return x_in < -87.0f ? 0.0f : p * scale;
}

struct CpuExp {
  float operator()(float v) const { return exp_poly(v); }
  double operator()(double v) const { return std::exp(v); }
};

// mish(((x - mean_hi) - mean_lo) * scale + shift): the normalised, affine-transformed input, through Mish.
template <typename A>
inline A bn_mish_value(A x, A mean_hi, A mean_lo, A scale, A shift) {
  return mish_forward(((x - mean_hi) - mean_lo) * scale + shift, CpuExp{});
}

// ---------------------------------------------------------------------------------------------------------
// mirror_split / mirror_fuse. The destination's dense dimension (W for NCHW, C for channels_last) is walked
// by contiguous runs; its other three dimensions index rows. Along W in NCHW the split axis itself is the
// run, read forwards or, for the mirrored part, backwards.
// ---------------------------------------------------------------------------------------------------------

struct Rows {
  int inner;
  int outer[3];  // outermost first
  int64_t count;
};

Rows rows_of(const View4& v, bool nhwc) {
  Rows r = nhwc ? Rows{1, {0, 2, 3}, 0} : Rows{3, {0, 1, 2}, 0};
  r.count = v.size[r.outer[0]] * v.size[r.outer[1]] * v.size[r.outer[2]];
  return r;
}

inline void unravel(int64_t row, const Rows& r, const View4& v, int64_t idx[4]) {
  idx[r.inner] = 0;
  for (int k = 2; k >= 0; --k) {
    const int d = r.outer[k];
    idx[d] = row % v.size[d];
    row /= v.size[d];
  }
}

// The index of the row after idx (an odometer over the outer dimensions; no division).
inline void next_row(const Rows& r, const View4& v, int64_t idx[4]) {
  for (int k = 2; k >= 0; --k) {
    const int d = r.outer[k];
    if (++idx[d] < v.size[d]) return;
    idx[d] = 0;
  }
}

template <typename T>
inline T* at_index(const View4& v, const int64_t idx[4]) {
  return reinterpret_cast<T*>(v.data) +
         (idx[0] * v.stride[0] + idx[1] * v.stride[1] + idx[2] * v.stride[2] + idx[3] * v.stride[3]);
}

template <typename T>
inline T* row_pointer(const View4& v, int64_t n, int64_t c, int64_t h) {
  return reinterpret_cast<T*>(v.data) + (n * v.stride[0] + c * v.stride[1] + h * v.stride[2]);
}

// Calls row(n, c, h) for every row of an NCHW-walked view v [N, C, H, W], in parallel over its N * C planes
// (cheaper per row than unravelling a flat row index: rows along W are short).
template <typename F>
void for_each_nchw_row(const View4& v, const F& row) {
  const int64_t channels = v.size[1], height = v.size[2];
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, height * v.size[3]));
  at::parallel_for(0, v.size[0] * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / channels, c = q % channels;
      for (int64_t h = 0; h < height; ++h) row(n, c, h);
    }
  });
}

// dst[i] = src[STEP * i], times `scale` unless it is 1 (then a raw copy: -0.0 and NaN payloads survive). A
// plain loop rather than memcpy: rows are short (tens of elements), where a library call costs more than the copy.
template <typename T, int STEP>
inline void copy_run(T* dst, const T* src, int64_t n, acc_t<T> scale) {
  if (scale != acc_t<T>(1)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<acc_t<T>>(src[STEP * i]) * scale);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = src[STEP * i];
  }
}

// dst[i] = 0 + a[STEP * i], rounded to T: the reference's zeros + z (so -0.0 becomes +0.0).
template <typename T, int STEP>
inline void zero_add_run(T* dst, const T* a, int64_t n) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(A(0) + static_cast<A>(a[STEP * i]));
}

// dst[i] = (0 + a[i]) + b[STEP * i] rounded once to T (exact as the reference's two in-place adds, since
// 0 + a is exact in T); "mean" then halves the rounded sum, as the reference's div_ does.
template <typename T, int STEP>
inline void sum_run(T* dst, const T* a, const T* b, int64_t n, bool mean) {
  using A = acc_t<T>;
  if (!mean) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      dst[i] = static_cast<T>((A(0) + static_cast<A>(a[i])) + static_cast<A>(b[STEP * i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T s = static_cast<T>((A(0) + static_cast<A>(a[i])) + static_cast<A>(b[STEP * i]));
      dst[i] = static_cast<T>(static_cast<A>(s) * A(0.5));
    }
  }
}

// d1[i] = s1[i] and d2[i] = s2[STEP * i] in one loop (measured ~30% faster than two loops on short rows).
template <typename T, int STEP>
inline void copy_row_pair_step(T* d1, T* d2, const T* s1, const T* s2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    d1[i] = s1[i];
    d2[i] = s2[STEP * i];
  }
}

template <typename T>
inline void copy_row_pair(T* d1, T* d2, const T* s1, const T* s2, int step, int64_t n) {
  if (step < 0) {
    copy_row_pair_step<T, -1>(d1, d2, s1, s2, n);
  } else {
    copy_row_pair_step<T, 1>(d1, d2, s1, s2, n);
  }
}

// One NCHW source row s along W (length L) into row d1 of part 1 and row d2 of part 2 (width P each).
template <typename T>
inline void split_row_along(T* d1, T* d2, const T* s, int64_t length, int64_t width, bool mirror, acc_t<T> scale) {
  const int64_t lo = length - width, ov = 2 * width - length;  // overlap columns [lo, width)
  const acc_t<T> one(1);
  if (scale == one) {  // the forward, and the adjoint of the "sum" fuse: both rows in one loop
    copy_row_pair<T>(d1, d2, s, mirror ? s + length - 1 : s + lo, mirror ? -1 : 1, width);
    return;
  }
  copy_run<T, 1>(d1, s, lo, one);
  copy_run<T, 1>(d1 + lo, s + lo, ov, scale);
  if (mirror) {
    copy_run<T, -1>(d2, s + length - 1, lo, one);
    copy_run<T, -1>(d2 + lo, s + width - 1, ov, scale);
  } else {
    copy_run<T, 1>(d2, s + lo, ov, scale);
    copy_run<T, 1>(d2 + ov, s + width, lo, one);
  }
}

// One NCHW output row along W from the rows a (part 1) and b (part 2) of width P.
template <typename T>
inline void fuse_row_along(T* d, const T* a, const T* b, int64_t length, int64_t width, bool mirror, bool mean) {
  const int64_t lo = length - width, ov = 2 * width - length;
  zero_add_run<T, 1>(d, a, lo);
  if (mirror) {
    sum_run<T, -1>(d + lo, a + lo, b + width - 1, ov, mean);
    if (lo > 0) zero_add_run<T, -1>(d + width, b + lo - 1, lo);
  } else {
    sum_run<T, 1>(d + lo, a + lo, b, ov, mean);
    zero_add_run<T, 1>(d + width, b + ov, lo);
  }
}

template <typename T>
void split_part_impl(const View4& src, const View4& dst, const MirrorGeometry& g, double scale_arg) {
  using A = acc_t<T>;
  const A scale = static_cast<A>(scale_arg);
  const int64_t batch = src.size[0], length = g.length, width = g.width;
  if (!g.nhwc && g.axis == 3) {
    // Along W in NCHW: source row [n, c, h] gives row [n, c, h] of part 1 and row [n + N, c, h] of part 2.
    const int64_t second = batch * dst.stride[0];
    for_each_nchw_row(src, [&](int64_t n, int64_t c, int64_t h) {
      T* d = row_pointer<T>(dst, n, c, h);
      split_row_along(d, d + second, row_pointer<const T>(src, n, c, h), length, width, g.mirror, scale);
    });
    return;
  }
  const Rows rows = rows_of(dst, g.nhwc);
  const int64_t inner = dst.size[rows.inner];
  at::parallel_for(0, rows.count, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
    int64_t idx[4], sidx[4];
    unravel(begin, rows, dst, idx);
    for (int64_t r = begin; r < end; ++r, next_row(rows, dst, idx)) {
      T* d = at_index<T>(dst, idx);
      const bool second = idx[0] >= batch;
      std::copy(idx, idx + 4, sidx);
      sidx[0] = second ? idx[0] - batch : idx[0];
      const int64_t j = idx[g.axis];
      const int64_t l = !second ? j : (g.mirror ? length - 1 - j : length - width + j);
      sidx[g.axis] = l;
      const bool overlap = l >= length - width && l < width;
      copy_run<T, 1>(d, at_index<const T>(src, sidx), inner, overlap ? scale : A(1));
    }
  });
}

template <typename T>
void fuse_part_impl(const View4& src, const View4& dst, const MirrorGeometry& g, bool mean) {
  const int64_t batch = dst.size[0], length = g.length, width = g.width;
  if (!g.nhwc && g.axis == 3) {
    // Along W in NCHW: output row [n, c, h] from row [n, c, h] of part 1 and row [n + N, c, h] of part 2.
    for_each_nchw_row(dst, [&](int64_t n, int64_t c, int64_t h) {
      fuse_row_along(row_pointer<T>(dst, n, c, h), row_pointer<const T>(src, n, c, h),
                     row_pointer<const T>(src, n + batch, c, h), length, width, g.mirror, mean);
    });
    return;
  }
  const Rows rows = rows_of(dst, g.nhwc);
  const int64_t inner = dst.size[rows.inner];
  at::parallel_for(0, rows.count, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
    int64_t idx[4], aidx[4], bidx[4];
    unravel(begin, rows, dst, idx);
    for (int64_t r = begin; r < end; ++r, next_row(rows, dst, idx)) {
      T* d = at_index<T>(dst, idx);
      std::copy(idx, idx + 4, aidx);
      std::copy(idx, idx + 4, bidx);
      bidx[0] += batch;
      const int64_t l = idx[g.axis];
      const bool has_a = l < width, has_b = l >= length - width;
      bidx[g.axis] = g.mirror ? length - 1 - l : l - (length - width);
      if (has_a && has_b) {
        sum_run<T, 1>(d, at_index<const T>(src, aidx), at_index<const T>(src, bidx), inner, mean);
      } else {
        zero_add_run<T, 1>(d, has_a ? at_index<const T>(src, aidx) : at_index<const T>(src, bidx), inner);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel reductions: two sums of f(c, i) per channel, in fp32 vector lanes over runs of at most kRun
// elements (rows), folded into fp64; the partition depends only on the shape, and partials are summed in a
// fixed order.
// ---------------------------------------------------------------------------------------------------------

template <typename A>
struct Pair {
  A a, b;
};

template <typename A, typename F>
void reduce_channels(const ChannelGeometry& g, const F& f, double* sums) {
  constexpr int kLanes = 16;  // independent fp32 partial sums along a plane (two AVX registers)
  constexpr int64_t kRun = 1024, kRows = 64;
  const int64_t C = g.C;
  std::fill(sums, sums + 2 * C, 0.0);
  if (!g.nhwc) {
    const int64_t S = g.S, planes = g.N * C;
    std::vector<double> part(2 * planes);
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrainElements / S), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / C, c = q % C, base = q * S;
        double t1 = 0, t2 = 0;
        for (int64_t s0 = 0; s0 < S; s0 += kRun) {
          const int64_t stop = std::min(S, s0 + kRun);
          A la[kLanes] = {}, lb[kLanes] = {};
          int64_t s = s0;
          for (; s + kLanes <= stop; s += kLanes) {
#pragma omp simd
            for (int k = 0; k < kLanes; ++k) {
              const Pair<A> v = f(c, base + s + k);
              la[k] += v.a;
              lb[k] += v.b;
            }
          }
          for (; s < stop; ++s) {
            const Pair<A> v = f(c, base + s);
            la[0] += v.a;
            lb[0] += v.b;
          }
          for (int k = 0; k < kLanes; ++k) {
            t1 += la[k];
            t2 += lb[k];
          }
        }
        part[2 * (c * g.N + n)] = t1;
        part[2 * (c * g.N + n) + 1] = t2;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t n = 0; n < g.N; ++n) {
        sums[c] += part[2 * (c * g.N + n)];
        sums[C + c] += part[2 * (c * g.N + n) + 1];
      }
    }
    return;
  }
  const int64_t rows = g.N * g.S;
  const int64_t per_block = std::max<int64_t>(1, kGrainElements / C);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  std::vector<double> part(2 * C * blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> l1(C), l2(C);
    for (int64_t blk = begin; blk < end; ++blk) {
      double* p1 = part.data() + 2 * C * blk;
      double* p2 = p1 + C;
      const int64_t r_end = std::min(rows, (blk + 1) * per_block);
      for (int64_t r0 = blk * per_block; r0 < r_end; r0 += kRows) {
        std::fill(l1.begin(), l1.end(), A(0));
        std::fill(l2.begin(), l2.end(), A(0));
        A* a1 = l1.data();
        A* a2 = l2.data();
        for (int64_t r = r0; r < std::min(r_end, r0 + kRows); ++r) {
          const int64_t base = r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const Pair<A> v = f(c, base + c);
            a1[c] += v.a;
            a2[c] += v.b;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          p1[c] += a1[c];
          p2[c] += a2[c];
        }
      }
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t c = 0; c < C; ++c) {
      sums[c] += part[2 * C * blk + c];
      sums[C + c] += part[2 * C * blk + C + c];
    }
  }
}

// x - shift[c] and its square: sums about a per-channel shift (the channel's first element) keep the
// variance E[d^2] - E[d]^2 free of cancellation when |mean| >> std.
template <typename T>
struct StatsTerm {
  const T* x;
  const acc_t<T>* shift;
  Pair<acc_t<T>> operator()(int64_t c, int64_t i) const {
    const acc_t<T> d = static_cast<acc_t<T>>(x[i]) - shift[c];
    return {d, d * d};
  }
};

// gz = gy * mish'(z) and gz * (x - mean), with z recomputed from x; p: the [5, C] parameters.
template <typename T>
struct GradTerm {
  const T* x;
  const T* gy;
  const acc_t<T>* p;
  int64_t C;
  Pair<acc_t<T>> operator()(int64_t c, int64_t i) const {
    using A = acc_t<T>;
    const A xm = (static_cast<A>(x[i]) - p[c]) - p[C + c];
    const A gz = static_cast<A>(gy[i]) * mish_derivative(xm * p[2 * C + c] + p[3 * C + c], CpuExp{});
    return {gz, gz * xm};
  }
};

// ---------------------------------------------------------------------------------------------------------
// Elementwise passes over [N, C, S] planes (per-plane constants) or [N*S, C] rows (per-channel arrays).
// ---------------------------------------------------------------------------------------------------------

// y = mish(z) (+ r) over one plane (per-channel constants p[j]) or one pixel row (per-channel arrays p[j]);
// p: mean_hi, mean_lo, scale, shift.
template <typename T>
void apply_plane(T* o, const T* x, const T* r, int64_t n, const acc_t<T>* p) {
  using A = acc_t<T>;
  const A hi = p[0], lo = p[1], scale = p[2], shift = p[3];
  if (r != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      o[i] = static_cast<T>(bn_mish_value(static_cast<A>(x[i]), hi, lo, scale, shift) + static_cast<A>(r[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(bn_mish_value(static_cast<A>(x[i]), hi, lo, scale, shift));
  }
}

template <typename T>
void apply_pixel(T* o, const T* x, const T* r, int64_t n, const acc_t<T>* const* p) {
  using A = acc_t<T>;
  const A *hi = p[0], *lo = p[1], *scale = p[2], *shift = p[3];
  if (r != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      o[i] = static_cast<T>(bn_mish_value(static_cast<A>(x[i]), hi[i], lo[i], scale[i], shift[i]) +
                            static_cast<A>(r[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      o[i] = static_cast<T>(bn_mish_value(static_cast<A>(x[i]), hi[i], lo[i], scale[i], shift[i]));
  }
}

// gx = scale * gz + k0 - (x - mean) * k2 with gz = gy * mish'(z), over one plane or one pixel row as above;
// p: mean_hi, mean_lo, scale, shift, k0, k2.
template <typename T>
void grad_plane(T* gx, const T* x, const T* gy, int64_t n, const acc_t<T>* p) {
  using A = acc_t<T>;
  const A hi = p[0], lo = p[1], scale = p[2], shift = p[3], k0 = p[4], k2 = p[5];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A xm = (static_cast<A>(x[i]) - hi) - lo;
    const A gz = static_cast<A>(gy[i]) * mish_derivative(xm * scale + shift, CpuExp{});
    gx[i] = static_cast<T>(scale * gz + k0 - xm * k2);
  }
}

template <typename T>
void grad_pixel(T* gx, const T* x, const T* gy, int64_t n, const acc_t<T>* const* p) {
  using A = acc_t<T>;
  const A *hi = p[0], *lo = p[1], *scale = p[2], *shift = p[3], *k0 = p[4], *k2 = p[5];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A xm = (static_cast<A>(x[i]) - hi[i]) - lo[i];
    const A gz = static_cast<A>(gy[i]) * mish_derivative(xm * scale[i] + shift[i], CpuExp{});
    gx[i] = static_cast<T>(scale[i] * gz + k0[i] - xm * k2[i]);
  }
}

template <typename T>
void apply_impl(const ChannelGeometry& g, const T* x, const acc_t<T>* params, const StridedView& res,
                const StridedView& out) {
  const int64_t C = g.C, S = g.S;
  T* o = reinterpret_cast<T*>(out.data);
  const T* r = reinterpret_cast<const T*>(res.data);
  if (!g.nhwc) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrainElements / S), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / C, c = q % C;
        const acc_t<T> p[4] = {params[c], params[C + c], params[2 * C + c], params[3 * C + c]};
        apply_plane(o + n * out.sN + c * out.sC, x + q * S, r ? r + n * res.sN + c * res.sC : nullptr, S, p);
      }
    });
    return;
  }
  const acc_t<T>* rows[4] = {params, params + C, params + 2 * C, params + 3 * C};
  at::parallel_for(0, g.N * S, std::max<int64_t>(1, kGrainElements / C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      apply_pixel(o + p * out.sP, x + p * C, r ? r + p * res.sP : nullptr, C, rows);
  });
}

template <typename T>
void grad_impl(const ChannelGeometry& g, T* gx, const T* x, const T* gy, const std::vector<acc_t<T>>& k) {
  // k: six [C] rows mean_hi, mean_lo, scale, shift, k0, k2
  const int64_t C = g.C, S = g.S;
  if (!g.nhwc) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrainElements / S), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t c = q % C;
        const acc_t<T> p[6] = {k[c], k[C + c], k[2 * C + c], k[3 * C + c], k[4 * C + c], k[5 * C + c]};
        grad_plane(gx + q * S, x + q * S, gy + q * S, S, p);
      }
    });
    return;
  }
  const acc_t<T>* rows[6];
  for (int j = 0; j < 6; ++j) rows[j] = k.data() + j * C;
  at::parallel_for(0, g.N * S, std::max<int64_t>(1, kGrainElements / C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) grad_pixel(gx + p * C, x + p * C, gy + p * C, C, rows);
  });
}

#define CSPM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

struct CpuKernels {
  static void split_part(const View4& src, const View4& dst, const MirrorGeometry& g, double scale,
                         at::ScalarType t) {
    CSPM_DISPATCH(t, "mirror_split", [&] { split_part_impl<scalar_t>(src, dst, g, scale); });
  }

  static void fuse_part(const View4& src, const View4& dst, const MirrorGeometry& g, bool mean, at::ScalarType t) {
    CSPM_DISPATCH(t, "mirror_fuse", [&] { fuse_part_impl<scalar_t>(src, dst, g, mean); });
  }

  static std::tuple<at::Tensor, at::Tensor> channel_stats(const ChannelGeometry& g, const at::Tensor& x) {
    const auto opts = x.options().dtype(at::kDouble);
    at::Tensor mean = new_output({g.C}, opts), var = new_output({g.C}, opts);
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_stats", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      std::vector<A> shift(g.C);
      for (int64_t c = 0; c < g.C; ++c) shift[c] = stats_shift(static_cast<A>(xp[g.nhwc ? c : c * g.S]));
      std::vector<double> sums(2 * g.C);
      reduce_channels<A>(g, StatsTerm<scalar_t>{xp, shift.data()}, sums.data());
      const double count = static_cast<double>(g.count());
      double* mp = mean.mutable_data_ptr<double>();
      double* vp = var.mutable_data_ptr<double>();
      for (int64_t c = 0; c < g.C; ++c) {
        const double d = sums[c] / count;
        mp[c] = static_cast<double>(shift[c]) + d;
        vp[c] = clamp_nonnegative(sums[g.C + c] / count - d * d);
      }
    });
    return {mean, var};
  }

  static at::Tensor channel_params(const at::Tensor& mean, const at::Tensor& var, double eps,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                   at::ScalarType acc) {
    const int64_t C = mean.numel();
    const auto as_double = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
    const at::Tensor m = as_double(mean), v = as_double(var);
    const at::Tensor w = weight.has_value() ? as_double(*weight) : at::Tensor();
    const at::Tensor b = bias.has_value() ? as_double(*bias) : at::Tensor();
    at::Tensor params = at::empty({5, C}, mean.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "channel_params", [&] {
      scalar_t* p = params.mutable_data_ptr<scalar_t>();
      const double *mp = m.const_data_ptr<double>(), *vp = v.const_data_ptr<double>();
      const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
      const double* bp = b.defined() ? b.const_data_ptr<double>() : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const double rstd = 1.0 / std::sqrt(vp[c] + eps);
        const scalar_t hi = static_cast<scalar_t>(mp[c]);
        p[c] = hi;
        p[C + c] = static_cast<scalar_t>(mp[c] - static_cast<double>(hi));
        p[2 * C + c] = static_cast<scalar_t>(wp ? wp[c] * rstd : rstd);
        p[3 * C + c] = static_cast<scalar_t>(bp ? bp[c] : 0.0);
        p[4 * C + c] = static_cast<scalar_t>(rstd);
      }
    });
    return params;
  }

  static void bn_apply(const ChannelGeometry& g, const at::Tensor& x, const at::Tensor& params,
                       const StridedView& residual, const StridedView& out) {
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_apply", [&] {
      using A = acc_t<scalar_t>;
      std::vector<A> identity;
      const A* p = nullptr;
      if (params.defined()) {
        p = params.const_data_ptr<A>();
      } else {  // conv epilogue: mish(x) itself
        identity.assign(5 * g.C, A(0));
        std::fill(identity.begin() + 2 * g.C, identity.begin() + 3 * g.C, A(1));
        p = identity.data();
      }
      apply_impl<scalar_t>(g, x.const_data_ptr<scalar_t>(), p, residual, out);
    });
  }

  static void bn_backward(const ChannelGeometry& g, const at::Tensor& gy, const at::Tensor& x,
                          const at::Tensor& params, bool training, const at::Tensor& gx, const at::Tensor& gw,
                          const at::Tensor& gb) {
    CSPM_DISPATCH(x.scalar_type(), "bn_mish_backward", [&] {
      using A = acc_t<scalar_t>;
      const int64_t C = g.C;
      const A* p = params.const_data_ptr<A>();
      const A *scale = p + 2 * C, *rstd = p + 4 * C;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
      std::vector<double> sums(2 * C, 0.0);  // sum gz, sum gz * (x - mean)
      if (training || gw.defined()) {
        reduce_channels<A>(g, GradTerm<scalar_t>{xp, gyp, p, C}, sums.data());
      }
      if (gw.defined()) {
        A* gwp = gw.mutable_data_ptr<A>();
        A* gbp = gb.mutable_data_ptr<A>();
        for (int64_t c = 0; c < C; ++c) {
          gwp[c] = static_cast<A>(sums[C + c] * static_cast<double>(rstd[c]));
          gbp[c] = static_cast<A>(sums[c]);
        }
      }
      // gx = scale * (gz - mean(gz) - xhat * mean(gz * xhat)), xhat = (x - mean) * rstd; eval: scale * gz.
      const double count = static_cast<double>(g.count());
      std::vector<A> k(6 * C);
      std::copy(p, p + 4 * C, k.begin());
      for (int64_t c = 0; c < C; ++c) {
        const double s = scale[c], r = rstd[c];
        k[4 * C + c] = static_cast<A>(training ? -s * sums[c] / count : 0.0);
        k[5 * C + c] = static_cast<A>(training ? s * r * r * sums[C + c] / count : 0.0);
      }
      grad_impl<scalar_t>(g, gx.mutable_data_ptr<scalar_t>(), xp, gyp, k);
    });
  }

  static void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                   const at::Tensor& var, double momentum, int64_t count) {
    // nn.BatchNorm2d: running = momentum * batch + (1 - momentum) * running, with the unbiased variance.
    const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    const auto update = [&](at::Tensor& running, const at::Tensor& batch, double factor) {
      at::Tensor r = running.to(at::kDouble).contiguous();
      double* rp = r.mutable_data_ptr<double>();
      const double* bp = batch.const_data_ptr<double>();
      for (int64_t c = 0; c < r.numel(); ++c) rp[c] = momentum * (bp[c] * factor) + (1.0 - momentum) * rp[c];
      running.copy_(r);
    };
    update(running_mean, m, 1.0);
    update(running_var, v, unbias);
  }
};

}  // namespace
}  // namespace cspmirror

TORCH_LIBRARY_IMPL(cspmirror_ext, CPU, m) { cspmirror::register_ops<cspmirror::CpuKernels>(m); }
