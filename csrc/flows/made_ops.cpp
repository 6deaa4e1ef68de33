// The torch-facing layer of the MADE one-pass inverse: schema, checks and CPU dispatch. Python
// (python/fusedlayers/flows/made_plan.py) sorts each layer's units by degree and describes the network as
// stages (see made_kernel.h).
#include "flows/made_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fl {

namespace {

using at::Tensor;
using OptTensorList = c10::List<std::optional<Tensor>>;

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t, int64_t row = 0) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() + row * t->size(-1) : nullptr;
}

std::tuple<Tensor, Tensor> made_inverse_cpu(const Tensor& targets, at::TensorList weights,
                                            const OptTensorList& biases, const OptTensorList& in_affine,
                                            const OptTensorList& out_affine, const OptTensorList& contexts,
                                            const Tensor& stage_info, const Tensor& offsets, int64_t activation,
                                            double epsilon) {
  constexpr const char* op = "made_inverse";
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 2, op, ": targets must be a 2-D CPU tensor, got ",
              targets.sizes());
  const auto dtype = targets.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": targets must be float32 or float64, got ",
                   dtype);
  const int64_t S = static_cast<int64_t>(weights.size()), D = targets.size(1), N = targets.size(0);
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(biases.size()) == S && static_cast<int64_t>(in_affine.size()) == S &&
                  static_cast<int64_t>(out_affine.size()) == S && static_cast<int64_t>(contexts.size()) == S,
              op, ": one weight, bias, affine and context entry per stage");
  TORCH_CHECK(stage_info.scalar_type() == at::kLong && stage_info.sizes() == at::IntArrayRef({S, 5}), op,
              ": stage_info must be int64 [stages, 5]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.sizes() == at::IntArrayRef({S, 2, D + 2}), op,
              ": offsets must be int64 [stages, 2, features + 2]");
  TORCH_CHECK(activation >= 0 && activation <= 3, op, ": unknown activation ", activation);
  const Tensor info = stage_info.contiguous(), offs = offsets.contiguous();
  const int64_t* si = info.data_ptr<int64_t>();
  std::vector<int64_t> buffer_units{D};
  for (int64_t s = 0; s < S; ++s) {
    const Tensor& w = weights[s];
    TORCH_CHECK(w.scalar_type() == dtype && w.dim() == 2 && w.is_contiguous(), op, ": weight ", s,
                " must be a contiguous 2-D tensor of the targets' dtype");
    const int64_t src = si[s * 5], dst = si[s * 5 + 1], residual = si[s * 5 + 2];
    TORCH_CHECK(src >= 0 && src < static_cast<int64_t>(buffer_units.size()) && buffer_units[src] == w.size(1), op,
                ": stage ", s, " reads a buffer that does not exist yet or has the wrong size");
    TORCH_CHECK(residual < static_cast<int64_t>(buffer_units.size()) &&
                    (residual < 0 || buffer_units[residual] == w.size(0)),
                op, ": stage ", s, " has a bad residual buffer");
    if (s + 1 < S) {
      TORCH_CHECK(dst == static_cast<int64_t>(buffer_units.size()), op, ": stage ", s,
                  " must write the next new buffer");
      buffer_units.push_back(w.size(0));
    } else {
      TORCH_CHECK(w.size(0) == 2 * D, op, ": the output stage must have 2 rows per feature");
    }
    for (const auto* list : {&biases, &contexts}) {
      const std::optional<Tensor> t = (*list)[s];
      if (t.has_value() && t->defined())
        TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->size(0) == w.size(0) &&
                        t->numel() == w.size(0) * (list == &contexts ? N : 1),
                    op, ": stage ", s, " has a bias or context of the wrong shape");
    }
    for (const auto& [t, units] : {std::pair{std::optional<Tensor>(in_affine[s]), w.size(1)},
                                   {std::optional<Tensor>(out_affine[s]), w.size(0)}})
      if (t.has_value() && t->defined())
        TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->sizes() == at::IntArrayRef({2, units}),
                    op, ": stage ", s, " has a batch-norm affine of the wrong shape");
  }
  const Tensor y = targets.contiguous();
  Tensor x = at::empty_like(y);
  Tensor logabsdet = at::empty({N}, y.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    std::vector<MadeStage<scalar_t>> stages(S);
    for (int64_t s = 0; s < S; ++s) {
      MadeStage<scalar_t>& st = stages[s];
      st.src = si[s * 5];
      st.dst = si[s * 5 + 1];
      st.residual = si[s * 5 + 2];
      st.act_in = si[s * 5 + 3] != 0;
      st.act_out = si[s * 5 + 4] != 0;
      st.in_units = weights[s].size(1);
      st.out_units = weights[s].size(0);
      st.weight = weights[s].data_ptr<scalar_t>();
      st.bias = data_or_null<scalar_t>(biases[s]);
      st.in_scale = data_or_null<scalar_t>(in_affine[s]);
      st.in_shift = data_or_null<scalar_t>(in_affine[s], 1);
      st.out_scale = data_or_null<scalar_t>(out_affine[s]);
      st.out_shift = data_or_null<scalar_t>(out_affine[s], 1);
      st.context = data_or_null<scalar_t>(contexts[s]);
      st.in_offsets = offs.data_ptr<int64_t>() + s * 2 * (D + 2);
      st.out_offsets = st.in_offsets + (D + 2);
    }
    MadeInverseArgs<scalar_t> a;
    a.batch = N;
    a.features = D;
    a.num_stages = S;
    a.num_buffers = static_cast<int64_t>(buffer_units.size());
    a.activation = static_cast<int>(activation);
    a.epsilon = static_cast<scalar_t>(epsilon);
    a.stages = stages.data();
    a.buffer_units = buffer_units.data();
    a.targets = y.data_ptr<scalar_t>();
    a.outputs = x.data_ptr<scalar_t>();
    a.logabsdet = logabsdet.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(made_inverse, a);
  });
  return {x, logabsdet};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Solves y = scale(x_<i) * x + shift(x_<i) for x (nflows' MAF inverse), one unit of each layer at a time in
  // degree order. stage_info rows: (src buffer, dst buffer, residual buffer or -1, act_in, act_out); offsets
  // [stage, (in, out), features + 2]; affines [2, units] (scale; shift); contexts [units, batch].
  m.def(
      "made_inverse(Tensor targets, Tensor[] weights, Tensor?[] biases, Tensor?[] in_affine, Tensor?[] out_affine, "
      "Tensor?[] contexts, Tensor stage_info, Tensor offsets, int activation, float epsilon) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) { m.impl("made_inverse", &fl::made_inverse_cpu); }
