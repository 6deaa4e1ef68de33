// One row of the affine coupling map in SIMD vectors (nflows' conventions, see coupling_kernel.h): shared by the
// coupling op's kernel and by the MADE slab kernel, which runs it as the epilogue of a fused conditioner.
// Included by ISA-built sources only, in their ISA's namespace (the row function's signature has no vector
// type that would keep each ISA's copy apart).
#pragma once

#include "common/isa.h"
#include "common/vec_math.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fl::FL_ISA {

template <typename T>
at::vec::Vectorized<T> load_partial(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}

// sigmoid(u + 2), the coupling's scale before its epsilon.
template <typename T>
at::vec::Vectorized<T> sigmoid_shifted(const at::vec::Vectorized<T>& u) {
  using Vec = at::vec::Vectorized<T>;
  return Vec(T(1)) / (Vec(T(1)) + (u + Vec(T(2))).neg().exp());
}

// y = x * scale + shift (or (x - shift) / scale when inverse) over `elements` values; returns the row's
// log|det|: sum log scale (or its negative).
template <typename T>
T coupling_row(const T* x, const T* shift, const T* raw, T* y, int64_t elements, bool inverse, T epsilon) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec log_sum(0);
  for (int64_t e = 0; e < elements; e += W) {
    const int64_t w = std::min(W, elements - e);
    const Vec scale = sigmoid_shifted(load_partial(raw + e, w)) + Vec(epsilon);
    const Vec out = inverse ? (load_partial(x + e, w) - load_partial(shift + e, w)) / scale
                            : at::vec::fmadd(load_partial(x + e, w), scale, load_partial(shift + e, w));
    out.store(y + e, w);
    log_sum = log_sum + Vec::set(Vec(0), log_(scale), w);  // lanes past the row's end add nothing
  }
  const T total = at::vec::vec_reduce_all<T>([](const Vec& p, const Vec& q) { return p + q; }, log_sum);
  return inverse ? -total : total;
}

}  // namespace fl::FL_ISA
