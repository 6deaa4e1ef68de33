// CPU kernel of the MADE one-pass inverse (see made_kernel.h). Built once per ISA.
//
// Samples are independent, so a work item is a slab of samples that runs the whole inverse on its own:
// activations are kept feature-major ([units, width], all of them in L2), and each step multiplies the few rows
// of degree k by the known prefix of the layer's inputs, a [rows x prefix] x [prefix x width] product.
#include "flows/made_kernel.h"

#include "common/gemm.h"
#include "common/parallel.h"
#include "flows/flow_math.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fl::FL_ISA {

namespace {

// Samples per slab: 64 (a multiple of the vector width) measured best at hidden 256, wider slabs were slower
// even for narrow networks; fewer only when a thread would otherwise get no slab.
template <typename T>
int64_t slab_width(const MadeInverseArgs<T>& a) {
  const int64_t per_thread = (a.batch + num_threads() - 1) / num_threads();
  return std::clamp<int64_t>((per_thread + 15) / 16 * 16, 16, 64);
}

template <typename T>
void activate(MadeActivation kind, T* row, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  if (kind == MadeActivation::relu || kind == MadeActivation::tanh) {
    for (; c + W <= n; c += W) {
      const Vec x = Vec::loadu(row + c);
      (kind == MadeActivation::relu ? at::vec::clamp_min(x, Vec(0)) : x.tanh()).store(row + c);
    }
  }
  for (; c < n; ++c) row[c] = made_activation(kind, row[c]);
}

template <typename T>
struct Slab {
  std::vector<std::vector<T>> buffers;   // [units, width] per buffer
  std::vector<std::vector<T>> prepared;  // per stage: its transformed inputs (empty if it reads src directly)
  std::vector<T> params;                 // [2, width]
  std::vector<T> logdet;
};

template <typename T>
bool needs_prepared(const MadeStage<T>& s) {
  return s.act_in || s.in_scale != nullptr;
}

// Rows [r0, r1) of the stage's input, transformed (batch norm, activation) into its prepared buffer.
template <typename T>
void prepare_rows(const MadeStage<T>& s, MadeActivation act, const T* src, T* prepared, int64_t r0, int64_t r1,
                  int64_t width) {
  for (int64_t r = r0; r < r1; ++r) {
    T* out = prepared + r * width;
    const T* in = src + r * width;
    const T scale = s.in_scale ? s.in_scale[r] : T(1), shift = s.in_shift ? s.in_shift[r] : T(0);
    for (int64_t c = 0; c < width; ++c) out[c] = scale * in[c] + shift;
    if (s.act_in) activate(act, out, width);
  }
}

// Units [r0, r1) of a stage from its first `k_inputs` inputs, into rows [r0 - dst_first, r1 - dst_first) of dst.
template <typename T>
void compute_units(const MadeStage<T>& s, MadeActivation act, const T* input, T* dst, int64_t dst_first,
                   const T* residual, int64_t r0, int64_t r1, int64_t k_inputs, int64_t width, int64_t batch,
                   int64_t n0) {
  if (r1 <= r0) return;
  T* first_row = dst + (r0 - dst_first) * width;
  if (k_inputs > 0)
    gemm(r1 - r0, width, k_inputs, s.weight + r0 * s.in_units, s.in_units, input, width, first_row, width, false);
  else
    std::fill(first_row, first_row + (r1 - r0) * width, T(0));
  for (int64_t r = r0; r < r1; ++r) {
    T* out = dst + (r - dst_first) * width;
    const T bias = s.bias ? s.bias[r] : T(0);
    const T* ctx = s.context ? s.context + r * batch + n0 : nullptr;
    const T scale = s.out_scale ? s.out_scale[r] : T(1), shift = s.out_shift ? s.out_shift[r] : T(0);
    for (int64_t c = 0; c < width; ++c) out[c] = scale * (out[c] + bias + (ctx ? ctx[c] : T(0))) + shift;
    if (s.act_out) activate(act, out, width);
    if (residual)
      for (int64_t c = 0; c < width; ++c) out[c] += residual[r * width + c];
  }
}

template <typename T>
void invert_slab(const MadeInverseArgs<T>& a, int64_t n0, int64_t width, Slab<T>& slab) {
  const int64_t D = a.features, S = a.num_stages;
  const auto act = static_cast<MadeActivation>(a.activation);
  slab.buffers.resize(a.num_buffers);
  for (int64_t b = 0; b < a.num_buffers; ++b) slab.buffers[b].assign(a.buffer_units[b] * width, T(0));
  slab.prepared.resize(S);
  for (int64_t s = 0; s < S; ++s)
    slab.prepared[s].assign(needs_prepared(a.stages[s]) ? a.stages[s].in_units * width : 0, T(0));
  slab.params.assign(2 * width, T(0));
  slab.logdet.assign(width, T(0));
  T* x = slab.buffers[0].data();
  for (int64_t k = 0; k < D; ++k) {
    // Hidden units of degree k (their inputs, of degree <= k, are all known now).
    for (int64_t si = 0; si + 1 < S; ++si) {
      const MadeStage<T>& s = a.stages[si];
      const T* src = slab.buffers[s.src].data();
      const T* input = src;
      if (needs_prepared(s)) {
        prepare_rows(s, act, src, slab.prepared[si].data(), s.in_offsets[k], s.in_offsets[k + 1], width);
        input = slab.prepared[si].data();
      }
      compute_units(s, act, input, slab.buffers[s.dst].data(), 0,
                    s.residual >= 0 ? slab.buffers[s.residual].data() : nullptr, s.out_offsets[k],
                    s.out_offsets[k + 1], s.in_offsets[k + 1], width, a.batch, n0);
    }
    // The output rows of feature k + 1 (degree k + 1) read hidden units of degree <= k; then solve for x.
    const MadeStage<T>& out = a.stages[S - 1];
    const int64_t r0 = out.out_offsets[k + 1];
    compute_units(out, act, slab.buffers[out.src].data(), slab.params.data(), r0, static_cast<const T*>(nullptr),
                  r0, out.out_offsets[k + 2], out.in_offsets[k + 1], width, a.batch, n0);  // rows r0, r0 + 1
    const T* unconstrained = slab.params.data();
    const T* shift = unconstrained + width;
    for (int64_t c = 0; c < width; ++c) {
      const T scale = affine_scale(unconstrained[c], a.epsilon);
      x[k * width + c] = affine_inverse(a.targets[(n0 + c) * D + k], shift[c], scale);
      slab.logdet[c] -= std::log(scale);
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    for (int64_t f = 0; f < D; ++f) a.outputs[(n0 + c) * D + f] = x[f * width + c];
    a.logabsdet[n0 + c] = slab.logdet[c];
  }
}

template <typename T>
void inverse(const MadeInverseArgs<T>& a) {
  const int64_t width = slab_width(a);
  const int64_t slabs = (a.batch + width - 1) / width;
  parallel_for(slabs, 1, [&](int64_t begin, int64_t end) {
    Slab<T> slab;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n0 = i * width;
      invert_slab(a, n0, std::min(width, a.batch - n0), slab);
    }
  });
}

}  // namespace

void made_inverse(const MadeInverseArgs<float>& args) { inverse(args); }
void made_inverse(const MadeInverseArgs<double>& args) { inverse(args); }

}  // namespace fl::FL_ISA
