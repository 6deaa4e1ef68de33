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

}  // namespace fl
