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

// float: a polynomial exp (20 ulp, about 2e-6 relative) and tanh(x) = 2 / (1 + exp(-2x)) - 1 on it. SLEEF's
// 1-ulp exp and tanh cost as much as a quarter of an LSTM step's GEMM; these cost a third of that, well inside
// the tolerance the layers are tested to. double keeps the exact functions (gradient checks).
// exp_u20 clamps its input, which would turn a NaN into a finite number: NaNs are passed through explicitly.
inline at::vec::Vectorized<float> exp_(const at::vec::Vectorized<float>& x) {
  return at::vec::Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
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
