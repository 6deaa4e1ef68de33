// SIMD overloads of the math in scalar_math.h, on torch's vector library (ATen/cpu/vec: SLEEF exp and tanh,
// whose symbols libtorch exports). Included only by kernel files, which are compiled once per ISA; include it
// before any per-element formula header so the formulas see these overloads.
#pragma once

#include "common/scalar_math.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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

// log: float takes SLEEF's 3.5-ulp variant (exported by libtorch), about half the cost of the 1-ulp one.
template <typename T>
inline at::vec::Vectorized<T> log_(const at::vec::Vectorized<T>& x) { return x.log(); }
inline at::vec::Vectorized<float> log_(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Sleef_logf16_u35(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return Sleef_logf8_u35(x);
#else
  return x.log();
#endif
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
