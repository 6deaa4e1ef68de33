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

}  // namespace fl
