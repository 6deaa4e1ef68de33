// SIMD overloads of the math in scalar_math.h, on torch's vector library (ATen/cpu/vec: SLEEF exp and tanh,
// whose symbols libtorch exports). Included only by kernel files, which are compiled once per ISA; include it
// before any per-element formula header so the formulas see these overloads.
#pragma once

#include "common/scalar_math.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>

namespace fl {

template <typename T>
inline at::vec::Vectorized<T> exp_(const at::vec::Vectorized<T>& x) { return x.exp(); }
template <typename T>
inline at::vec::Vectorized<T> tanh_(const at::vec::Vectorized<T>& x) { return x.tanh(); }

// float: a polynomial exp and tanh(x) = 2 / (1 + exp(-2x)) - 1 on it. SLEEF's 1-ulp exp and tanh cost as much
// as a quarter of an LSTM step's GEMM. double keeps the exact functions (gradient checks).
// AVX-512: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (Cody and Waite), exp(r) from a
// degree-6 polynomial fitted to minimise the relative error on [-ln2/2, ln2/2], and 2^n applied by vscalefps,
// which also gives 0 and inf past the float range: 1.3 ulp at worst (7.6e-8), and 13 instructions where torch's
// exp_u20 (20 ulp, flushes to 0 below -87.3) takes 21. The clamp's operand order keeps NaN: min/max return their
// second operand when either is NaN.
// Other ISAs: exp_u20, whose clamp would turn a NaN into a finite number, so NaNs are passed through explicitly.
#if defined(FL_HAVE_AVX512)
// The AVX-512 exp without its clamp: v must lie in [-104, 89] or be NaN.
inline __m512 exp_unclamped_avx512(__m512 v) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);  // 0.693359375: ln 2 to 9 bits, n * it exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.381461275741458e-3f);
  for (const float c : {8.368710055947304e-3f, 4.166838899254799e-2f, 1.666652113199234e-1f, 4.999999403953552e-1f,
                        1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
// 2^u with a degree-4 polynomial in u's fraction (relative error 2.7e-6, about torch's exp_u20): for values about
// to be rounded to bfloat16 (relative step 3.9e-3), such as a bf16 attention's probabilities, whose caller folds
// log2(e) into its own scale, so that no range reduction by ln 2 is needed (two instructions fewer than exp).
inline __m512 exp2_for_bf16_unclamped_avx512(__m512 u) {
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);  // exact: |f| <= 1/2
  __m512 p = _mm512_set1_ps(9.57009569e-3f);
  for (const float c : {5.59178628e-2f, 2.40247443e-1f, 6.93121791e-1f, 9.99999285e-1f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif
inline at::vec::Vectorized<float> exp_(const at::vec::Vectorized<float>& x) {
#if defined(FL_HAVE_AVX512)
  return exp_unclamped_avx512(
      _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), __m512(x))));
#else
  return at::vec::Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
#endif
}
inline at::vec::Vectorized<float> tanh_(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  return V(2) / (V(1) + exp_(x * V(-2))) - V(1);
}

// log. float: the exponent split off and log(m), m in [sqrt(1/2), sqrt(2)), from a degree-8 polynomial in m - 1
// (Cephes' single-precision scheme, about 1 ulp), inline on torch's vector types so that every ISA build shares
// it: a MAF takes two logs per feature, and SLEEF's call (3.5 ulp) cost a tenth of its forward pass. Lanes that
// are not positive, finite and normal (rare: NaN, inf, 0, negatives, denormals) take SLEEF's log.
template <typename T>
inline at::vec::Vectorized<T> log_(const at::vec::Vectorized<T>& x) { return x.log(); }
inline at::vec::Vectorized<float> log_(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  using I = at::vec::Vectorized<int32_t>;
  const I bits = at::vec::cast<int32_t>(x);
  V m = at::vec::cast<float>((bits & I(0x007fffff)) | I(0x3f800000));  // the mantissa, in [1, 2)
  const V high = m > V(1.41421356237f);
  m = V::blendv(m, m * V(0.5f), high);
  const V e = at::vec::convert_to_fp_of_same_size<float>((bits >> I(23)) - I(127)) + (high & V(1.f));
  const V z = m - V(1.f), z2 = z * z;
  V p(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    p = at::vec::fmadd(p, z, V(c));
  V y = p * z * z2;
  y = at::vec::fmadd(e, V(-2.12194440e-4f), y);  // ln 2 in two parts: e * ln 2 loses nothing
  y = at::vec::fmadd(z2, V(-0.5f), y);
  const V result = at::vec::fmadd(e, V(0.693359375f), z + y);
  const V ordinary = (x >= V(1.17549435e-38f)) & (x < V(std::numeric_limits<float>::infinity()));
  if (ordinary.zero_mask() == 0) return result;  // no lane is 0.0f, the pattern of a failed comparison
  return V::blendv(x.log(), result, ordinary);
}

// torch's softplus (beta 1, threshold 20). float: log1p(e) as log(u) + (e - (u - 1)) / u with u = 1 + e, which
// restores what rounding 1 + e lost (e below float epsilon gives e), on the fast exp and log above.
template <typename T>
inline at::vec::Vectorized<T> softplus_(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(x.exp().log1p(), x, x > V(T(20)));
}
inline at::vec::Vectorized<float> softplus_(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  const V e = exp_(x), u = V(1.f) + e;
  return V::blendv(log_(u) + (e - (u - V(1.f))) / u, x, x > V(20.f));
}

}  // namespace fl
