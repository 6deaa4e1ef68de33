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

// ---- the forward pass (density direction) and its backward

// Biases and contexts are Tensor[] (autograd returns one gradient list per list argument only when every entry
// is a tensor); an empty tensor stands for an absent one.
bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

struct LayerList {
  std::vector<int64_t> src, residual, act_in, act_out;
};

LayerList check_layers(const Tensor& inputs, at::TensorList weights_t, at::TensorList weights,
                       at::TensorList biases, at::TensorList contexts, at::TensorList extents,
                       at::IntArrayRef layer_info) {
  constexpr const char* op = "made_forward";
  TORCH_CHECK(inputs.device().is_cpu() && inputs.dim() == 2 && inputs.is_contiguous(), op,
              ": inputs must be a contiguous 2-D CPU tensor, got ", inputs.sizes());
  const auto dtype = inputs.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": inputs must be float32 or float64, got ",
                   dtype);
  const int64_t L = static_cast<int64_t>(weights_t.size()), N = inputs.size(0), D = inputs.size(1);
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == L && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(contexts.size()) == L && static_cast<int64_t>(extents.size()) == L,
              op, ": one weight, bias, context and extent entry per layer");
  TORCH_CHECK(static_cast<int64_t>(layer_info.size()) == 4 * L, op, ": layer_info must hold 4 ints per layer");
  const int64_t* li = layer_info.data();
  LayerList out;
  std::vector<int64_t> units{D};
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& wt = weights_t[l];
    TORCH_CHECK(wt.scalar_type() == dtype && wt.dim() == 2 && wt.is_contiguous() && weights[l].is_contiguous() &&
                    weights[l].scalar_type() == dtype && weights[l].sizes() == at::IntArrayRef({wt.size(1), wt.size(0)}),
                op, ": layer ", l, " needs contiguous weight_t [in, out] and weight [out, in] of the inputs' dtype");
    const int64_t src = li[l * 4], residual = li[l * 4 + 1];
    TORCH_CHECK(src >= 0 && src <= l && units[src] == wt.size(0), op, ": layer ", l,
                " reads a buffer that does not exist yet or has the wrong size");
    TORCH_CHECK(residual <= l && (residual < 0 || units[residual] == wt.size(1)), op, ": layer ", l,
                " has a bad residual buffer");
    const Tensor& ext = extents[l];
    TORCH_CHECK(ext.scalar_type() == at::kLong && ext.is_contiguous() && ext.numel() == wt.size(1), op,
                ": layer ", l, " needs an int64 extent per output unit");
    TORCH_CHECK(ext.numel() == 0 || (ext.min().item<int64_t>() >= 0 && ext.max().item<int64_t>() <= wt.size(0) &&
                                     (ext.numel() < 2 || (ext.diff() >= 0).all().item<bool>())),
                op, ": layer ", l, " extents must be non-decreasing and within the inputs");
    const Tensor& bias = biases[l];
    const Tensor& context = contexts[l];
    if (present(bias))
      TORCH_CHECK(bias.scalar_type() == dtype && bias.is_contiguous() && bias.numel() == wt.size(1), op,
                  ": layer ", l, " bias must have ", wt.size(1), " elements");
    if (present(context))
      TORCH_CHECK(context.scalar_type() == dtype && context.is_contiguous() &&
                      context.sizes() == at::IntArrayRef({N, wt.size(1)}),
                  op, ": layer ", l, " context must be [batch, ", wt.size(1), "]");
    units.push_back(wt.size(1));
    out.src.push_back(src);
    out.residual.push_back(residual);
    out.act_in.push_back(li[l * 4 + 2]);
    out.act_out.push_back(li[l * 4 + 3]);
  }
  TORCH_CHECK(units.back() == 2 * D, op, ": the output layer must have 2 units per feature");
  return out;
}

template <typename T>
std::vector<MadeLayer<T>> describe(const LayerList& list, at::TensorList weights_t, at::TensorList weights,
                                   at::TensorList biases, at::TensorList contexts,
                                   at::TensorList extents, at::TensorList saved) {
  std::vector<MadeLayer<T>> layers(weights_t.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    MadeLayer<T>& y = layers[l];
    y.src = list.src[l];
    y.residual = list.residual[l];
    y.act_in = list.act_in[l] != 0;
    y.act_out = list.act_out[l] != 0;
    y.in_units = weights_t[l].size(0);
    y.out_units = weights_t[l].size(1);
    y.weight_t = weights_t[l].data_ptr<T>();
    y.weight = weights[l].data_ptr<T>();
    y.bias = present(biases[l]) ? biases[l].data_ptr<T>() : nullptr;
    y.context = present(contexts[l]) ? contexts[l].data_ptr<T>() : nullptr;
    y.extent = extents[l].data_ptr<int64_t>();
    y.dst = saved[3 * l].data_ptr<T>();
    y.activated = y.act_in ? saved[3 * l + 1].data_ptr<T>() : nullptr;
    y.pre = y.act_out ? saved[3 * l + 2].data_ptr<T>() : nullptr;
  }
  return layers;
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> made_forward_cpu(
    const Tensor& inputs, at::TensorList weights_t, at::TensorList weights, at::TensorList biases,
    at::TensorList contexts, at::TensorList extents, at::IntArrayRef layer_info, int64_t activation,
    double epsilon) {
  TORCH_CHECK(activation >= 0 && activation <= 3, "made_forward: unknown activation ", activation);
  const LayerList list = check_layers(inputs, weights_t, weights, biases, contexts, extents, layer_info);
  const int64_t N = inputs.size(0);
  std::vector<Tensor> saved;
  for (size_t l = 0; l < weights_t.size(); ++l) {
    const int64_t in = weights_t[l].size(0), out = weights_t[l].size(1);
    saved.push_back(at::empty({N, out}, inputs.options()));
    saved.push_back(at::empty({list.act_in[l] ? N : 0, in}, inputs.options()));
    saved.push_back(at::empty({list.act_out[l] ? N : 0, out}, inputs.options()));
  }
  Tensor outputs = at::empty_like(inputs), logabsdet = at::empty({N}, inputs.options());
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "made_forward", [&] {
    auto layers = describe<scalar_t>(list, weights_t, weights, biases, contexts, extents, saved);
    MadeForwardArgs<scalar_t> a;
    a.batch = N;
    a.features = inputs.size(1);
    a.num_layers = static_cast<int64_t>(layers.size());
    a.activation = static_cast<int>(activation);
    a.epsilon = static_cast<scalar_t>(epsilon);
    a.layers = layers.data();
    a.inputs = inputs.data_ptr<scalar_t>();
    a.outputs = outputs.data_ptr<scalar_t>();
    a.logabsdet = logabsdet.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(made_forward, a);
  });
  return {outputs, logabsdet, saved};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> made_backward_cpu(
    const Tensor& grad_outputs, const Tensor& grad_logabsdet, const Tensor& inputs, at::TensorList weights_t,
    at::TensorList weights, at::TensorList biases, at::TensorList contexts, at::TensorList extents,
    at::IntArrayRef layer_info, at::TensorList saved, int64_t activation, double epsilon) {
  const LayerList list = check_layers(inputs, weights_t, weights, biases, contexts, extents, layer_info);
  const int64_t N = inputs.size(0), L = static_cast<int64_t>(weights_t.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 3 * L, "made_backward: saved must come from made_forward");
  const Tensor go = grad_outputs.to(inputs.scalar_type()).contiguous();
  const Tensor gl = grad_logabsdet.to(inputs.scalar_type()).contiguous();
  TORCH_CHECK(go.sizes() == inputs.sizes() && gl.numel() == N, "made_backward: gradients of the wrong shape");
  Tensor grad_inputs = at::empty_like(inputs);
  std::vector<Tensor> grad_wt, grad_b, grad_ctx;
  for (int64_t l = 0; l < L; ++l) {
    grad_wt.push_back(at::empty_like(weights_t[l]));
    const bool has_bias = present(biases[l]), has_ctx = present(contexts[l]);
    grad_b.push_back(at::empty({has_bias ? weights_t[l].size(1) : 0}, inputs.options()));
    grad_ctx.push_back(at::empty({has_ctx ? N : 0, weights_t[l].size(1)}, inputs.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "made_backward", [&] {
    auto layers = describe<scalar_t>(list, weights_t, weights, biases, contexts, extents, saved);
    std::vector<scalar_t*> dwt(L), db(L), dctx(L);
    for (int64_t l = 0; l < L; ++l) {
      dwt[l] = grad_wt[l].data_ptr<scalar_t>();
      db[l] = grad_b[l].numel() ? grad_b[l].data_ptr<scalar_t>() : nullptr;
      dctx[l] = grad_ctx[l].numel() ? grad_ctx[l].data_ptr<scalar_t>() : nullptr;
    }
    MadeBackwardArgs<scalar_t> a;
    a.batch = N;
    a.features = inputs.size(1);
    a.num_layers = L;
    a.activation = static_cast<int>(activation);
    a.epsilon = static_cast<scalar_t>(epsilon);
    a.layers = layers.data();
    a.inputs = inputs.data_ptr<scalar_t>();
    a.grad_outputs = go.data_ptr<scalar_t>();
    a.grad_logabsdet = gl.data_ptr<scalar_t>();
    a.grad_inputs = grad_inputs.data_ptr<scalar_t>();
    a.grad_weight_t = dwt.data();
    a.grad_bias = db.data();
    a.grad_context = dctx.data();
    FL_DISPATCH_ISA(made_backward, a);
  });
  return {grad_inputs, grad_wt, grad_b, grad_ctx};
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

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // The MAF forward with its log-determinant in one pass. layer_info, 4 per layer: (src buffer, residual buffer or -1,
  // act_in, act_out); buffer 0 is the inputs, buffer l + 1 layer l's output. Units are sorted by degree; an empty bias or context is an absent one;
  // extents[l][u] is how many inputs unit u reads. Returns (outputs, logabsdet, saved activations).
  m.def(
      "made_forward(Tensor inputs, Tensor[] weights_t, Tensor[] weights, Tensor[] biases, Tensor[] contexts, "
      "Tensor[] extents, int[] layer_info, int activation, float epsilon) -> (Tensor, Tensor, Tensor[])");
  m.def(
      "made_backward(Tensor grad_outputs, Tensor grad_logabsdet, Tensor inputs, Tensor[] weights_t, "
      "Tensor[] weights, Tensor[] biases, Tensor[] contexts, Tensor[] extents, int[] layer_info, "
      "Tensor[] saved, int activation, float epsilon) -> (Tensor, Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("made_inverse", &fl::made_inverse_cpu);
  m.impl("made_forward", &fl::made_forward_cpu);
  m.impl("made_backward", &fl::made_backward_cpu);
}
