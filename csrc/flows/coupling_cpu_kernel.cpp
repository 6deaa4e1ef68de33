// CPU kernels of the affine coupling map (see coupling_kernel.h). Built once per ISA. Rows are independent:
// a work item is a range of rows, each handled in SIMD vectors (libm's scalar exp and log would cost more than
// the rest of the layer).
#include "flows/coupling_kernel.h"

#include "common/parallel.h"
#include "flows/coupling_rows.h"
#include "flows/flow_math.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace fl::FL_ISA {

namespace {

using at::vec::Vectorized;

// Calls fn(row, x, shift, unconstrained) for every row, rows shared among threads.
template <typename T, typename Fn>
void over_rows(const CouplingArgs<T>& a, const Fn& fn) {
  const int64_t E = a.elements;
  parallel_for(a.batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) fn(n, a.inputs + n * E, a.params + n * 2 * E, a.params + n * 2 * E + E);
  });
}

template <typename T>
void forward(const CouplingArgs<T>& a) {
  const int64_t E = a.elements;
  over_rows(a, [&](int64_t n, const T* x, const T* shift, const T* raw) {
    a.logabsdet[n] = coupling_row(x, shift, raw, a.outputs + n * E, E, a.inverse, a.epsilon);
  });
}

template <typename T>
void backward(const CouplingArgs<T>& a) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t E = a.elements;
  over_rows(a, [&](int64_t n, const T* x, const T* shift, const T* raw) {
    const T* dy = a.grad_outputs + n * E;
    const Vec dl(a.grad_logabsdet[n]);
    T* dx = a.grad_inputs + n * E;
    T* dshift = a.grad_params + n * 2 * E;
    T* draw = dshift + E;
    for (int64_t e = 0; e < E; e += W) {
      const int64_t w = std::min(W, E - e);
      const Vec sig = sigmoid_shifted(load_partial(raw + e, w));
      const Vec scale = sig + Vec(a.epsilon);
      const Vec g = load_partial(dy + e, w);
      Vec dscale;
      if (a.inverse) {  // y = (x - shift) / scale, logabsdet = -sum log scale
        const Vec inv = Vec(T(1)) / scale;
        (g * inv).store(dx + e, w);
        (g * inv).neg().store(dshift + e, w);
        dscale = ((g * (load_partial(x + e, w) - load_partial(shift + e, w)) * inv) + dl).neg() * inv;
      } else {  // y = x * scale + shift, logabsdet = sum log scale
        (g * scale).store(dx + e, w);
        g.store(dshift + e, w);
        dscale = at::vec::fmadd(g, load_partial(x + e, w), dl / scale);
      }
      (dscale * sig * (Vec(T(1)) - sig)).store(draw + e, w);
    }
  });
}

}  // namespace

void coupling_affine(const CouplingArgs<float>& args) { forward(args); }
void coupling_affine(const CouplingArgs<double>& args) { forward(args); }
void coupling_affine_backward(const CouplingArgs<float>& args) { backward(args); }
void coupling_affine_backward(const CouplingArgs<double>& args) { backward(args); }

}  // namespace fl::FL_ISA
