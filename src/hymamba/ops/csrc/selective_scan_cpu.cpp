// Fused CPU selective scan (Mamba S6) forward and backward.
//
// Built on first use by hymamba/ops/cpu_kernel.py with
// torch.utils.cpp_extension.load (flags, cache key and fallbacks live there).
// Only ATen/c10 headers are included (no torch/extension.h, no pybind11): that
// keeps the one-time compile at a few seconds. The ops are registered with the
// dispatcher under the namespace HYMAMBA_OPS_NS (unique per build) and wrapped
// by the Python custom ops hymamba::scan_cpu_fwd / hymamba::scan_cpu_bwd.
//
// Semantics are those of mamba_ssm's selective_scan_ref:
//   delta <- delta + delta_bias; if softplus: delta <- softplus(delta)
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,  h_{-1} = 0
//   y_t = sum_n C_t[n] h_t[n] + D * u_t
//
// Layout of the work: a task is (batch b, block of W consecutive channels).
// The W channels of a block occupy the W lanes of one SIMD vector (GCC vector
// extensions, so the same source compiles to AVX-512, AVX2, SSE or NEON), which
// vectorises the exp(delta * A) that dominates the cost (a polynomial 2^x with
// A pre-scaled by log2 e; vscalefps on AVX-512). A task first transposes its
// (W, L) slices of u / delta into (L, W) buffers (W x W register transposes),
// then runs the recurrence over t with up to 8 states held in registers;
// larger d_state is processed in chunks of 8/4/2/1 states (states are
// independent until the sum over n, which is accumulated across chunks).
//
// Reductions over channels (dB, dC) and over batch (dA, dD, d delta_bias) are
// written per task into partial buffers and summed afterwards in a fixed order:
// no races, and results do not depend on the number of threads.
//
// float32 inputs compute and accumulate in float32 with a polynomial exp/log1p
// (about 1 ulp); float64 inputs use std::exp/std::log1p lane by lane.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef HYMAMBA_OPS_NS
#define HYMAMBA_OPS_NS hymamba_scan_cpu
#endif

#define HYM_INLINE inline __attribute__((always_inline))

namespace hymamba_scan {
namespace {

// 64-byte vectors where AVX-512 is available, otherwise 32 bytes (one AVX
// register, or two SSE/NEON registers).
#if defined(HYMAMBA_VEC_BYTES)
constexpr int kVecBytes = HYMAMBA_VEC_BYTES;  // override, for experiments
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  static constexpr int W = kVecBytes / 4;
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));

  static HYM_INLINE V splat(float x) { return V{} + x; }
  static HYM_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static HYM_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }

  // e^r for |r| <= ln2 / 2 (Cephes expf polynomial, max error ~1 ulp).
  static HYM_INLINE V exp_poly(V r) {
    V p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (r * r) * p + r + 1.0f;
  }

  // exp(x) = 2^n e^r with n = round(x / ln2) and r = x - n ln2 (ln2 split in
  // two constants so r is exact enough). NaN propagates: the clamps are
  // written as min/max patterns (hi < x ? hi : x), which return x for NaN.
  static HYM_INLINE V exp(V x) {
#if defined(__AVX512F__)
    if constexpr (kVecBytes == 64) {
      // vscalefps applies 2^n with libm's under/overflow behaviour (denormals,
      // 0, inf); the clamp only bounds r for huge |x| (exp(-104) rounds to 0).
      __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x);
      v = _mm512_min_ps(_mm512_set1_ps(89.0f), v);
      const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const V r = ((V)v - (V)n * 0.693359375f) - (V)n * -2.12194440e-4f;
      return (V)_mm512_scalef_ps((__m512)exp_poly(r), n);
    }
#endif
    // Portable: 2^n built in the exponent bits, so x is clamped to
    // [log(FLT_MIN), 88] to keep 2^n a normal float: exp(x < -87.3) returns
    // ~1.2e-38 instead of a denormal/0 and x > 88 saturates at 1.65e38.
    const V hi = splat(88.0f), lo = splat(-87.33654475f);
    x = hi < x ? hi : x;
    x = lo > x ? lo : x;
    // round() via truncation of a positive number: no reliance on the
    // round-to-nearest magic constant (which fast-math may fold away).
    const I ki = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, I);  // n + 128
    const V n = __builtin_convertvector(ki, V) - 128.0f;
    const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    const I bits = (ki - 1) << 23;  // biased exponent n + 127, in [1, 254]
    return exp_poly(r) * (V)bits;   // GCC vector cast = bit reinterpretation
  }

  // 2^x. The state loops use exp(delta * A) = exp2(delta * (A log2 e)) with
  // A log2 e precomputed per channel: compared with exp() this saves the
  // log2(e) multiply and the two-constant range reduction (f = x - n is
  // exact). Degree-6 fit of 2^f on [-1/2, 1/2] (max rel. error 2.6e-9 before
  // float32 rounding, ~1e-7 after).
  static HYM_INLINE V exp2_poly(V f) {
    V p = splat(1.5345811587e-4f);
    p = p * f + 1.3399931216e-3f;
    p = p * f + 9.6184889587e-3f;
    p = p * f + 5.5503287770e-2f;
    p = p * f + 2.4022646891e-1f;
    p = p * f + 6.9314720574e-1f;
    return p * f + 1.0f;
  }

  static HYM_INLINE V exp2(V x) {
#if defined(__AVX512F__)
    if constexpr (kVecBytes == 64) {
      // vscalefps gives denormals/0 and inf like libm, also for huge |x|
      // (f = x - n is then 0). The clamp maps -inf to 0 instead of NaN
      // (inf - inf in f); +inf yields NaN instead of inf, which the
      // recurrence would turn into inf/NaN anyway, so it is not clamped.
      const __m512 v = _mm512_max_ps(_mm512_set1_ps(-151.0f), (__m512)x);  // NaN -> NaN
      const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return (V)_mm512_scalef_ps((__m512)exp2_poly((V)v - (V)n), n);
    }
#endif
    // Clamped so that 2^n is a normal float (as in exp()).
    const V hi = splat(127.4f), lo = splat(-126.0f);
    x = hi < x ? hi : x;
    x = lo > x ? lo : x;
    const I ki = __builtin_convertvector(x + 128.5f, I);  // round(x) + 128
    const V f = x - (__builtin_convertvector(ki, V) - 128.0f);
    const I bits = (ki - 1) << 23;
    return exp2_poly(f) * (V)bits;
  }

  // exp(delta * A) = decay(delta * (A * kDecayScale)).
  static constexpr float kDecayScale = 1.44269504088896341f;
  static HYM_INLINE V decay(V x) { return exp2(x); }

  // log(1 + z) for z in [0, 1] (Cephes logf polynomial). Splitting at
  // sqrt(2) - 1 keeps the polynomial argument exact for small z, so tiny z
  // loses no precision (what log1p is for).
  static HYM_INLINE V log1p_unit(V z) {
    const auto small = z < 0.41421356237f;
    const V f = small ? z : (z - 1.0f) * 0.5f;
    const V e = small ? splat(0.0f) : splat(1.0f);
    const V f2 = f * f;
    V p = splat(7.0376836292e-2f);
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    V y = f * f2 * p + e * -2.12194440e-4f;
    y = y - 0.5f * f2;
    return f + y + e * 0.693359375f;
  }

  // torch.nn.functional.softplus (beta=1, threshold=20):
  // x if x > 20 else log1p(exp(x)), evaluated as max(x,0) + log1p(exp(-|x|)).
  static HYM_INLINE V softplus(V x) {
    const V ax = x < 0.0f ? -x : x;
    const V pos = x > 0.0f ? x : splat(0.0f);
    const V r = pos + log1p_unit(exp(-ax));
    return x > 20.0f ? x : r;
  }

  // softplus(x) and its derivative (torch: 1 if x > 20 else sigmoid(x)) from
  // one exp: with z = exp(-|x|), sigmoid(x) = 1 / (1 + z) for x >= 0 and
  // z / (1 + z) for x < 0.
  static HYM_INLINE V softplus_with_grad(V x, V* grad) {
    const V ax = x < 0.0f ? -x : x;
    const V pos = x > 0.0f ? x : splat(0.0f);
    const V z = exp(-ax);
    const V r = 1.0f / (1.0f + z);
    const V sig = x < 0.0f ? z * r : r;
    *grad = x > 20.0f ? splat(1.0f) : sig;
    const V sp = pos + log1p_unit(z);
    return x > 20.0f ? x : sp;
  }
};

template <>
struct Simd<double> {
  static constexpr int W = kVecBytes / 8;
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));  // shuffle masks

  static HYM_INLINE V splat(double x) { return V{} + x; }
  static HYM_INLINE V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static HYM_INLINE void store(double* p, V v) { std::memcpy(p, &v, sizeof(V)); }

  // The float64 path favours exactness over speed: libm, lane by lane.
  static HYM_INLINE V exp(V x) {
    V r;
    for (int i = 0; i < W; ++i) r[i] = std::exp(x[i]);
    return r;
  }
  // exp(delta * A) = decay(delta * (A * kDecayScale)); see Simd<float>.
  static constexpr double kDecayScale = 1.0;
  static HYM_INLINE V decay(V x) { return exp(x); }

  static HYM_INLINE V softplus(V x) {
    V r;
    for (int i = 0; i < W; ++i) r[i] = x[i] > 20.0 ? x[i] : std::log1p(std::exp(x[i]));
    return r;
  }
  static HYM_INLINE V softplus_with_grad(V x, V* grad) {
    V r;
    for (int i = 0; i < W; ++i) {
      const double z = std::exp(x[i]);
      r[i] = x[i] > 20.0 ? x[i] : std::log1p(z);
      (*grad)[i] = x[i] > 20.0 ? 1.0 : z / (z + 1.0);
    }
    return r;
  }
};

// ---------------------------------------------------------------------------
// Two-input lane shuffle with compile-time indices K (into the concatenation
// of a and b). __builtin_shufflevector needs GCC >= 12 or Clang; older GCC has
// __builtin_shuffle with a constant mask vector, which compiles the same way.

#if defined(__clang__) || (__GNUC__ >= 12 && !defined(HYMAMBA_FORCE_BUILTIN_SHUFFLE))
#define HYM_SHUFFLEVECTOR 1
#endif

template <typename T, int... K>
HYM_INLINE typename Simd<T>::V shuffle2(typename Simd<T>::V a, typename Simd<T>::V b) {
#ifdef HYM_SHUFFLEVECTOR
  return __builtin_shufflevector(a, b, K...);
#else
  return __builtin_shuffle(a, b, typename Simd<T>::I{K...});
#endif
}

// ---------------------------------------------------------------------------
// Horizontal sums of many vectors at once ("transpose and add"): W vectors in,
// one vector out whose lane k is the sum of the lanes of input k. log2(W)
// levels of pairwise shuffles + adds instead of W separate horizontal sums.

template <int W, int G>
struct FoldMask {
  // Inputs hold W/G groups of G lanes (group j = partial sums of one original
  // vector). Output: lower halves of a's groups then of b's groups (lo), or the
  // upper halves (hi); lo + hi halves every group.
  static constexpr int lo(int k) {
    const int src = k < W / 2 ? 0 : W;
    const int kk = k % (W / 2);
    const int half = G / 2;
    return src + (kk / half) * G + kk % half;
  }
  static constexpr int hi(int k) { return lo(k) + G / 2; }
};

template <typename T, int G, int... K>
HYM_INLINE typename Simd<T>::V fold_pair(typename Simd<T>::V a, typename Simd<T>::V b,
                                         std::integer_sequence<int, K...>) {
  constexpr int W = Simd<T>::W;
  return shuffle2<T, FoldMask<W, G>::lo(K)...>(a, b) + shuffle2<T, FoldMask<W, G>::hi(K)...>(a, b);
}

template <typename T, int G>
HYM_INLINE void fold_levels(typename Simd<T>::V* v, int count) {
  for (int i = 0; i < count / 2; ++i) {
    v[i] = fold_pair<T, G>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, Simd<T>::W>{});
  }
  if constexpr (G > 2) fold_levels<T, G / 2>(v, count / 2);
}

// out[k] = sum over lanes of vector k of src (vectors stored contiguously),
// k < count. out must have room for count rounded up to a multiple of W.
template <typename T>
void lane_sums(const T* src, int64_t count, T* out) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  V v[W];
  for (int64_t k0 = 0; k0 < count; k0 += W) {
    const int64_t m = std::min<int64_t>(W, count - k0);
    for (int i = 0; i < W; ++i) v[i] = i < m ? S::load(src + (k0 + i) * W) : S::splat(T(0));
    fold_levels<T, W>(v, W);
    S::store(out + k0, v[0]);
  }
}

// In-register transpose of a W x W tile held as W vectors (row i = v[i]).
// Stage with half-width H swaps the off-diagonal H x H sub-blocks of every
// 2H x 2H block: log2(W) stages of 2 shuffles per row pair.

template <int W, int H>
struct TransposeMask {
  // Lane k of the new row i (lo) / row i + H (hi) for the row pair (i, i + H).
  static constexpr int lo(int k) {
    const int base = (k / (2 * H)) * 2 * H, p = k % (2 * H);
    return p < H ? base + p : W + base + (p - H);
  }
  static constexpr int hi(int k) { return lo(k) + H; }
};

template <typename T, int H, int... K>
HYM_INLINE void transpose_stage(typename Simd<T>::V* v, std::integer_sequence<int, K...>) {
  using V = typename Simd<T>::V;
  constexpr int W = Simd<T>::W;
  for (int i = 0; i < W; ++i) {
    if ((i / H) % 2 != 0) continue;
    const V a = v[i], b = v[i + H];
    v[i] = shuffle2<T, TransposeMask<W, H>::lo(K)...>(a, b);
    v[i + H] = shuffle2<T, TransposeMask<W, H>::hi(K)...>(a, b);
  }
}

template <typename T, int H = Simd<T>::W / 2>
HYM_INLINE void transpose_tile(typename Simd<T>::V* v) {
  transpose_stage<T, H>(v, std::make_integer_sequence<int, Simd<T>::W>{});
  if constexpr (H > 1) transpose_tile<T, H / 2>(v);
}

// ---------------------------------------------------------------------------

template <typename T>
struct AlignedBuf {
  T* p = nullptr;
  explicit AlignedBuf(size_t n) {
    const size_t bytes = std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64);
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// A (batch, rows, time) view with element strides.
template <typename T>
struct View3 {
  const T* p = nullptr;
  int64_t sb = 0, sr = 0, st = 0;
};

template <typename T>
View3<T> view3(const at::Tensor& x) {
  return View3<T>{x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2)};
}

template <typename T>
struct ScanArgs {
  int64_t batch = 0, dim = 0, len = 0, nstate = 0, nblk = 0;
  View3<T> u, delta, B, C, dout;
  const T* A = nullptr;     // (dim, nstate), contiguous
  const T* D = nullptr;     // (dim,) or nullptr
  const T* bias = nullptr;  // (dim,) or nullptr
  bool softplus = false;
};

// dst[t*W + w] = x[b, d0 + w, t] for w < nd, 0 for the padding lanes.
// Contiguous time axis: W x W tiles transposed in registers; otherwise (and
// for the last L % W steps) element by element.
template <typename T>
void gather_block(const View3<T>& x, int64_t b, int64_t d0, int64_t nd, int64_t L, T* dst) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const T* base = x.p + b * x.sb + d0 * x.sr;
  int64_t t0 = 0;
  if (x.st == 1) {
    V v[W];
    for (; t0 + W <= L; t0 += W) {
      for (int w = 0; w < W; ++w) v[w] = w < nd ? S::load(base + w * x.sr + t0) : S::splat(T(0));
      transpose_tile<T>(v);
      for (int j = 0; j < W; ++j) S::store(dst + (t0 + j) * W, v[j]);
    }
  }
  for (int64_t w = 0; w < W; ++w) {
    const T* s = base + w * x.sr;
    for (int64_t t = t0; t < L; ++t) dst[t * W + w] = w < nd ? s[t * x.st] : T(0);
  }
}

// out[b, d0 + w, t] = src[t*W + w] for w < nd; out is contiguous (B, dim, L).
template <typename T>
void scatter_block(const T* src, int64_t b, int64_t d0, int64_t nd, int64_t dim, int64_t L, T* out) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  T* base = out + (b * dim + d0) * L;
  int64_t t0 = 0;
  V v[W];
  for (; t0 + W <= L; t0 += W) {
    for (int j = 0; j < W; ++j) v[j] = S::load(src + (t0 + j) * W);
    transpose_tile<T>(v);
    for (int w = 0; w < nd; ++w) S::store(base + w * L + t0, v[w]);
  }
  for (int64_t w = 0; w < nd; ++w)
    for (int64_t t = t0; t < L; ++t) base[w * L + t] = src[t * W + w];
}

// Per-channel parameter as a lane vector: lanes w < nd get p[(d0 + w) * stride].
template <typename T>
HYM_INLINE typename Simd<T>::V lanes(const T* p, int64_t d0, int64_t nd, int64_t stride) {
  constexpr int W = Simd<T>::W;
  alignas(64) T tmp[W];
  for (int w = 0; w < W; ++w) tmp[w] = (p != nullptr && w < nd) ? p[(d0 + w) * stride] : T(0);
  return Simd<T>::load(tmp);
}

// Split d_state into register-sized chunks of 8/4/2/1 states.
template <typename F>
HYM_INLINE void for_each_state_chunk(int64_t N, F&& f) {
  int64_t n0 = 0;
  while (n0 < N) {
    const int64_t r = N - n0;
    const int nc = r >= 8 ? 8 : r >= 4 ? 4 : r >= 2 ? 2 : 1;
    f(n0, nc);
    n0 += nc;
  }
}

// DT[t] = delta after bias and softplus, from the gathered delta in X[t].
// With with_grad and softplus (backward), X[t] is overwritten by the
// softplus derivative.
template <typename T>
HYM_INLINE void make_dt(const ScanArgs<T>& a, int64_t d0, int64_t nd, T* X, T* DT, bool with_grad) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const V bias = lanes(a.bias, d0, nd, 1);
  for (int64_t t = 0; t < a.len; ++t) {
    const V x = S::load(X + t * W) + bias;
    if (!a.softplus) {
      S::store(DT + t * W, x);
    } else if (with_grad) {
      V g;
      S::store(DT + t * W, S::softplus_with_grad(x, &g));
      S::store(X + t * W, g);
    } else {
      S::store(DT + t * W, S::softplus(x));
    }
  }
}

// ---------------------------------------------------------------------------
// Forward

// Adds sum_{n in [n0, n0+NC)} C_t[n] h_t[n] to Y[t] for every t.
template <typename T, int NC>
void fwd_states(const ScanArgs<T>& a, int64_t b, int64_t d0, int64_t nd, int64_t n0, const T* DT,
                const T* U, T* Y) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  V As[NC], h[NC];  // As = A * kDecayScale
  for (int n = 0; n < NC; ++n) {
    As[n] = lanes(a.A + n0 + n, d0, nd, a.nstate) * S::kDecayScale;
    h[n] = S::splat(T(0));
  }
  const T* Bp = a.B.p + b * a.B.sb + n0 * a.B.sr;
  const T* Cp = a.C.p + b * a.C.sb + n0 * a.C.sr;
  const int64_t sBn = a.B.sr, sBt = a.B.st, sCn = a.C.sr, sCt = a.C.st;
  for (int64_t t = 0; t < a.len; ++t) {
    const V dt = S::load(DT + t * W);
    const V du = dt * S::load(U + t * W);
    V y = S::load(Y + t * W);
    // Full unrolling keeps h[] and Av[] in registers (GCC stops at NC = 8).
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) {
      const V e = S::decay(dt * As[n]);
      h[n] = e * h[n] + du * Bp[n * sBn + t * sBt];
      y = y + Cp[n * sCn + t * sCt] * h[n];
    }
    S::store(Y + t * W, y);
  }
}

template <typename T>
void scan_fwd_impl(const ScanArgs<T>& a, T* y) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t L = a.len;
  at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
    AlignedBuf<T> U(L * W), X(L * W), DT(L * W), Y(L * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / a.nblk, d0 = (task % a.nblk) * W;
      const int64_t nd = std::min<int64_t>(W, a.dim - d0);
      gather_block(a.u, b, d0, nd, L, U.p);
      gather_block(a.delta, b, d0, nd, L, X.p);
      make_dt(a, d0, nd, X.p, DT.p, false);
      const V Dv = lanes(a.D, d0, nd, 1);
      for (int64_t t = 0; t < L; ++t) S::store(Y.p + t * W, Dv * S::load(U.p + t * W));
      for_each_state_chunk(a.nstate, [&](int64_t n0, int nc) {
        switch (nc) {
          case 8: fwd_states<T, 8>(a, b, d0, nd, n0, DT.p, U.p, Y.p); break;
          case 4: fwd_states<T, 4>(a, b, d0, nd, n0, DT.p, U.p, Y.p); break;
          case 2: fwd_states<T, 2>(a, b, d0, nd, n0, DT.p, U.p, Y.p); break;
          default: fwd_states<T, 1>(a, b, d0, nd, n0, DT.p, U.p, Y.p); break;
        }
      });
      scatter_block(Y.p, b, d0, nd, a.dim, L, y);
    }
  });
}

// ---------------------------------------------------------------------------
// Backward
//
// Per task and state chunk: recompute the forward storing h_t and
// exp(delta_t A) for every step (2 * L * NC vectors per thread; no chunked
// checkpointing, so memory per thread grows with L), then run the adjoint
// recurrence from t = L-1 down to 0:
//   dh_t    += C_t dy_t
//   dA      += dh_t delta_t exp(delta_t A) h_{t-1}
//   ddelta_t = sum_n dh_t (A exp(delta_t A) h_{t-1} + B_t u_t)
//   du_t     = sum_n dh_t delta_t B_t + D dy_t
//   dB_t    += sum_d dh_t delta_t u_t,  dC_t += sum_d h_t dy_t
//   dh_{t-1} = exp(delta_t A) dh_t

// Per-(batch, block) partials for the per-channel gradients, and per-task
// partials for dB / dC, which are sums over channels. A task covers `group`
// consecutive channel blocks of one batch row: the whole row (group = nblk)
// when the batch is large enough to keep the threads busy, else one block
// (group = 1). A task adds its blocks' per-lane dB / dC contributions into
// lane accumulators and sums over lanes once at its end, so whole-row tasks
// pay for one lane reduction per row instead of one per block. The choice
// depends on the batch size only: results do not depend on the thread count.
constexpr int64_t kWholeRowMinBatch = 8;

template <typename T>
struct BwdPartials {
  int64_t group;  // channel blocks per task; divides nblk
  T* dA;          // (batch * nblk, nstate, W)
  T* dD;          // (batch * nblk, W)
  T* dbias;       // (batch * nblk, W)
  T* dB;          // (batch * nblk / group, L, nstate)
  T* dC;          // (batch * nblk / group, L, nstate)
};

// accB / accC: per-lane dB / dC accumulators, (L, nstate) vectors; the first
// block of a task writes them (accumulate = false), later blocks add.
template <typename T, int NC>
void bwd_states(const ScanArgs<T>& a, int64_t b, int64_t d0, int64_t nd, int64_t n0, const T* DT,
                const T* U, const T* DY, T* DU, T* DDT, T* H, T* E, T* pA, T* accB, T* accC,
                bool accumulate) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t L = a.len, N = a.nstate;
  const T* Bp = a.B.p + b * a.B.sb + n0 * a.B.sr;
  const T* Cp = a.C.p + b * a.C.sb + n0 * a.C.sr;
  const int64_t sBn = a.B.sr, sBt = a.B.st, sCn = a.C.sr, sCt = a.C.st;
  V Av[NC], As[NC], h[NC];  // As = A * kDecayScale
  for (int n = 0; n < NC; ++n) {
    Av[n] = lanes(a.A + n0 + n, d0, nd, N);
    As[n] = Av[n] * S::kDecayScale;
    h[n] = S::splat(T(0));
    S::store(H + n * W, h[n]);  // row 0 of H is h_{-1} = 0
  }
  // Forward recompute: H row t+1 = h_t, E row t = exp(delta_t A).
  for (int64_t t = 0; t < L; ++t) {
    const V dt = S::load(DT + t * W);
    const V du = dt * S::load(U + t * W);
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) {
      const V e = S::decay(dt * As[n]);
      h[n] = e * h[n] + du * Bp[n * sBn + t * sBt];
      S::store(E + (t * NC + n) * W, e);
      S::store(H + ((t + 1) * NC + n) * W, h[n]);
    }
  }
  // Adjoint pass.
  V dh[NC], dAacc[NC];
  for (int n = 0; n < NC; ++n) dh[n] = dAacc[n] = S::splat(T(0));
  for (int64_t t = L - 1; t >= 0; --t) {
    const V dy = S::load(DY + t * W);
    const V u = S::load(U + t * W);
    const V dt = S::load(DT + t * W);
    const V dtu = dt * u;
    V s = S::splat(T(0)), ddt = S::splat(T(0));
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) {
      const T Bn = Bp[n * sBn + t * sBt];
      const T Cn = Cp[n * sCn + t * sCt];
      const V e = S::load(E + (t * NC + n) * W);
      const V hprev = S::load(H + (t * NC + n) * W);
      const V hcur = S::load(H + ((t + 1) * NC + n) * W);
      const V dhn = dh[n] + Cn * dy;
      const V g = dhn * e * hprev;
      dAacc[n] = dAacc[n] + dt * g;
      ddt = ddt + Av[n] * g;
      s = s + dhn * Bn;
      T* c_p = accC + (t * N + n0 + n) * W;
      T* b_p = accB + (t * N + n0 + n) * W;
      S::store(c_p, accumulate ? S::load(c_p) + hcur * dy : hcur * dy);
      S::store(b_p, accumulate ? S::load(b_p) + dhn * dtu : dhn * dtu);
      dh[n] = e * dhn;
    }
    S::store(DU + t * W, S::load(DU + t * W) + dt * s);
    S::store(DDT + t * W, S::load(DDT + t * W) + ddt + u * s);
  }
  for (int n = 0; n < NC; ++n) S::store(pA + (n0 + n) * W, dAacc[n]);
}

template <typename T>
void scan_bwd_impl(const ScanArgs<T>& a, T* du, T* ddelta, const BwdPartials<T>& part) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t L = a.len, N = a.nstate;
  const int64_t nc_max = std::min<int64_t>(8, std::max<int64_t>(N, 1));
  const int64_t red_len = (L * N + W - 1) / W * W;
  const int64_t group = part.group, ngroups = a.nblk / part.group;
  at::parallel_for(0, a.batch * ngroups, 1, [&](int64_t begin, int64_t end) {
    AlignedBuf<T> U(L * W), X(L * W), DT(L * W), DY(L * W), DU(L * W), DDT(L * W);
    AlignedBuf<T> H((L + 1) * nc_max * W), E(L * nc_max * W);
    AlignedBuf<T> accB(L * N * W), accC(L * N * W), red(red_len);
    for (int64_t block = begin * group; block < end * group; ++block) {
      const int64_t b = block / a.nblk, d0 = (block % a.nblk) * W;
      const int64_t nd = std::min<int64_t>(W, a.dim - d0);
      const int64_t task = block / group;
      const bool accumulate = block % group != 0, last_of_task = block % group == group - 1;
      gather_block(a.u, b, d0, nd, L, U.p);
      gather_block(a.delta, b, d0, nd, L, X.p);
      gather_block(a.dout, b, d0, nd, L, DY.p);
      make_dt(a, d0, nd, X.p, DT.p, true);  // with softplus, X becomes its derivative
      const V Dv = lanes(a.D, d0, nd, 1);
      V dD = S::splat(T(0));
      for (int64_t t = 0; t < L; ++t) {
        const V dy = S::load(DY.p + t * W);
        S::store(DU.p + t * W, Dv * dy);
        S::store(DDT.p + t * W, S::splat(T(0)));
        dD = dD + dy * S::load(U.p + t * W);
      }
      T* pA = part.dA + block * N * W;
      T* pB = part.dB + task * L * N;
      T* pC = part.dC + task * L * N;
      for_each_state_chunk(N, [&](int64_t n0, int nc) {
#define HYM_BWD_STATES(NC) \
  bwd_states<T, NC>(a, b, d0, nd, n0, DT.p, U.p, DY.p, DU.p, DDT.p, H.p, E.p, pA, accB.p, accC.p, accumulate)
        switch (nc) {
          case 8: HYM_BWD_STATES(8); break;
          case 4: HYM_BWD_STATES(4); break;
          case 2: HYM_BWD_STATES(2); break;
          default: HYM_BWD_STATES(1); break;
        }
#undef HYM_BWD_STATES
      });
      if (last_of_task) {  // sum the accumulated contributions over lanes
        lane_sums(accB.p, L * N, red.p);
        std::copy(red.p, red.p + L * N, pB);
        lane_sums(accC.p, L * N, red.p);
        std::copy(red.p, red.p + L * N, pC);
      }
      // Chain rule through delta + bias and the softplus.
      V dbias = S::splat(T(0));
      for (int64_t t = 0; t < L; ++t) {
        V g = S::load(DDT.p + t * W);
        if (a.softplus) g = g * S::load(X.p + t * W);
        S::store(DDT.p + t * W, g);
        dbias = dbias + g;
      }
      S::store(part.dD + block * W, dD);
      S::store(part.dbias + block * W, dbias);
      scatter_block(DU.p, b, d0, nd, a.dim, L, du);
      scatter_block(DDT.p, b, d0, nd, a.dim, L, ddelta);
    }
  });
}

// Sums the per-task partials: dB/dC over channel blocks, dA/dD/dbias over the
// batch (in double, the longest sums).
template <typename T>
void reduce_partials(const ScanArgs<T>& a, const BwdPartials<T>& part, T* dA, T* dB, T* dC, T* dD,
                     T* dbias) {
  constexpr int W = Simd<T>::W;
  const int64_t L = a.len, N = a.nstate, nblk = a.nblk, ngroups = nblk / part.group;
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> accB(L * N), accC(L * N);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(accB.begin(), accB.end(), T(0));
      std::fill(accC.begin(), accC.end(), T(0));
      for (int64_t k = 0; k < ngroups; ++k) {
        const T* pB = part.dB + (b * ngroups + k) * L * N;
        const T* pC = part.dC + (b * ngroups + k) * L * N;
        for (int64_t i = 0; i < L * N; ++i) {
          accB[i] += pB[i];
          accC[i] += pC[i];
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < L; ++t) {
          dB[(b * N + n) * L + t] = accB[t * N + n];
          dC[(b * N + n) * L + t] = accC[t * N + n];
        }
    }
  });
  at::parallel_for(0, a.dim, 16, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const int64_t k = d / W, w = d % W;
      double sD = 0, sbias = 0;
      for (int64_t b = 0; b < a.batch; ++b) {
        sD += part.dD[(b * nblk + k) * W + w];
        sbias += part.dbias[(b * nblk + k) * W + w];
      }
      if (dD != nullptr) dD[d] = T(sD);
      if (dbias != nullptr) dbias[d] = T(sbias);
      for (int64_t n = 0; n < N; ++n) {
        double sA = 0;
        for (int64_t b = 0; b < a.batch; ++b) sA += part.dA[((b * nblk + k) * N + n) * W + w];
        dA[d * N + n] = T(sA);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Dispatcher entry points

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& bias) {
  const auto dt = u.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "selective_scan_cpu: expected float32/float64, got ", dt);
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (batch, dim, L)");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan_cpu: delta must have the shape of u");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan_cpu: A must be (dim, N)");
  const int64_t N = A.size(1);
  for (const at::Tensor* x : {&B, &C}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == batch && x->size(1) == N && x->size(2) == L,
                "selective_scan_cpu: B and C must be (batch, N, L)");
  }
  for (const std::optional<at::Tensor>* x : {&D, &bias}) {
    if (x->has_value()) {
      TORCH_CHECK((*x)->dim() == 1 && (*x)->size(0) == dim, "selective_scan_cpu: D and delta_bias must be (dim,)");
      TORCH_CHECK((*x)->scalar_type() == dt, "selective_scan_cpu: dtype mismatch");
      TORCH_CHECK((*x)->device().is_cpu(), "selective_scan_cpu: expected CPU tensors");
    }
  }
  for (const at::Tensor* x : {&delta, &A, &B, &C}) {
    TORCH_CHECK(x->scalar_type() == dt, "selective_scan_cpu: dtype mismatch");
    TORCH_CHECK(x->device().is_cpu(), "selective_scan_cpu: expected CPU tensors");
  }
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: expected CPU tensors");
}

template <typename T>
ScanArgs<T> make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& C, const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& bias, bool softplus) {
  ScanArgs<T> a;
  a.batch = u.size(0);
  a.dim = u.size(1);
  a.len = u.size(2);
  a.nstate = A.size(1);
  a.nblk = (a.dim + Simd<T>::W - 1) / Simd<T>::W;
  a.u = view3<T>(u);
  a.delta = view3<T>(delta);
  a.B = view3<T>(B);
  a.C = view3<T>(C);
  a.A = A.data_ptr<T>();
  a.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  a.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  a.softplus = softplus;
  return a;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& x) {
  if (!x.has_value()) return std::nullopt;
  return x->contiguous();
}

at::Tensor scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_in, const at::Tensor& B,
                    const at::Tensor& C, const std::optional<at::Tensor>& D_in,
                    const std::optional<at::Tensor>& bias_in, bool softplus) {
  check_inputs(u, delta, A_in, B, C, D_in, bias_in);
  const at::Tensor A = A_in.contiguous();
  const auto D = contiguous_opt(D_in), bias = contiguous_opt(bias_in);
  at::Tensor y = at::empty({u.size(0), u.size(1), u.size(2)}, u.options());
  if (y.numel() == 0) return y;
  if (u.scalar_type() == at::kFloat) {
    scan_fwd_impl<float>(make_args<float>(u, delta, A, B, C, D, bias, softplus), y.data_ptr<float>());
  } else {
    scan_fwd_impl<double>(make_args<double>(u, delta, A, B, C, D, bias, softplus), y.data_ptr<double>());
  }
  return y;
}

template <typename T>
void run_bwd(ScanArgs<T> a, const at::Tensor& dout, at::Tensor& du, at::Tensor& ddelta, at::Tensor& dA,
             at::Tensor& dB, at::Tensor& dC, at::Tensor* dD, at::Tensor* dbias) {
  constexpr int W = Simd<T>::W;
  a.dout = view3<T>(dout);
  const int64_t nblocks = a.batch * a.nblk;
  const int64_t group = a.batch >= kWholeRowMinBatch ? a.nblk : 1;
  const int64_t ntask = nblocks / group;
  const auto opts = du.options();
  at::Tensor pA = at::empty({nblocks * a.nstate * W}, opts);
  at::Tensor pD = at::empty({nblocks * W}, opts), pbias = at::empty({nblocks * W}, opts);
  at::Tensor pB = at::empty({ntask * a.len * a.nstate}, opts), pC = at::empty({ntask * a.len * a.nstate}, opts);
  const BwdPartials<T> part{group, pA.data_ptr<T>(), pD.data_ptr<T>(), pbias.data_ptr<T>(), pB.data_ptr<T>(),
                            pC.data_ptr<T>()};
  scan_bwd_impl<T>(a, du.data_ptr<T>(), ddelta.data_ptr<T>(), part);
  reduce_partials<T>(a, part, dA.data_ptr<T>(), dB.data_ptr<T>(), dC.data_ptr<T>(),
                     dD ? dD->data_ptr<T>() : nullptr, dbias ? dbias->data_ptr<T>() : nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_in,
    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& bias_in, bool softplus) {
  check_inputs(u, delta, A_in, B, C, D_in, bias_in);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type() && dout.device().is_cpu(),
              "selective_scan_cpu: dout must match u");
  const at::Tensor A = A_in.contiguous();
  const auto D = contiguous_opt(D_in), bias = contiguous_opt(bias_in);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const auto opts = u.options();
  at::Tensor du = at::empty({batch, dim, L}, opts), ddelta = at::empty({batch, dim, L}, opts);
  at::Tensor dA = at::empty({dim, N}, opts);
  at::Tensor dB = at::empty({batch, N, L}, opts), dC = at::empty({batch, N, L}, opts);
  // Absent D / delta_bias get 0-element gradients (the op always returns 7).
  at::Tensor dD = at::empty({D.has_value() ? dim : 0}, opts);
  at::Tensor dbias = at::empty({bias.has_value() ? dim : 0}, opts);
  if (batch == 0 || dim == 0 || L == 0) {
    // Empty problem: every gradient is an (empty or) zero sum.
    for (at::Tensor* g : {&dA, &dB, &dC, &dD, &dbias}) g->zero_();
    return {du, ddelta, dA, dB, dC, dD, dbias};
  }
  at::Tensor* pdD = D.has_value() ? &dD : nullptr;
  at::Tensor* pdbias = bias.has_value() ? &dbias : nullptr;
  if (u.scalar_type() == at::kFloat) {
    run_bwd<float>(make_args<float>(u, delta, A, B, C, D, bias, softplus), dout, du, ddelta, dA, dB, dC, pdD,
                   pdbias);
  } else {
    run_bwd<double>(make_args<double>(u, delta, A, B, C, D, bias, softplus), dout, du, ddelta, dA, dB, dC, pdD,
                    pdbias);
  }
  return {du, ddelta, dA, dB, dC, dD, dbias};
}

}  // namespace
}  // namespace hymamba_scan

// TORCH_LIBRARY pastes its namespace argument, so expand the macro first.
#define HYM_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define HYM_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

HYM_TORCH_LIBRARY(HYMAMBA_OPS_NS, m) {
  m.def(
      "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
      "bool delta_softplus) -> Tensor");
  m.def(
      "bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? delta_bias, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Channels per SIMD block of the float32 kernel; for tests and benchmarks.
  m.def("vector_width() -> int", []() -> int64_t { return hymamba_scan::Simd<float>::W; });
}

HYM_TORCH_LIBRARY_IMPL(HYMAMBA_OPS_NS, CPU, m) {
  m.impl("fwd", &hymamba_scan::scan_fwd);
  m.impl("bwd", &hymamba_scan::scan_bwd);
}
