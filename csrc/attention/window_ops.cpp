// The torch-facing layer of windowed attention (Luong local-p): schemas, checks and CPU dispatch. Python
// (python/fusedlayers/nn/luong.py) predicts the windows and the Gaussian factors, differentiably, and passes
// them here.
#include "attention/window_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fl {

namespace {

using at::Tensor;

struct Prepared {
  Tensor query, source, factor, first, valid;
};

Prepared prepare(const Tensor& query, const Tensor& source, const Tensor& factor, const Tensor& first,
                 const Tensor& valid) {
  constexpr const char* op = "window_attention";
  for (const auto& [t, name] : {std::pair{&query, "query"}, {&source, "source"}, {&factor, "factor"},
                                {&first, "first"}, {&valid, "valid"}})
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(query.dim() == 3 && source.dim() == 3 && query.size(0) == source.size(0) &&
                  query.size(2) == source.size(2),
              op, ": query [batch, q_len, hidden] and source [batch, src_len, hidden] must agree, got ",
              query.sizes(), " and ", source.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kFloat || dtype == at::kDouble) && source.scalar_type() == dtype &&
                       factor.scalar_type() == dtype,
                   op, ": query, source and factor must all be float32 or all float64, got ", dtype, ", ",
                   source.scalar_type(), " and ", factor.scalar_type());
  TORCH_CHECK(factor.dim() == 3 && factor.size(0) == query.size(0) && factor.size(1) == query.size(1),
              op, ": factor must have shape [batch, q_len, width], got ", factor.sizes());
  TORCH_CHECK_TYPE(first.scalar_type() == at::kLong && valid.scalar_type() == at::kBool,
                   op, ": first must be int64 and valid bool");
  TORCH_CHECK(first.sizes() == query.sizes().slice(0, 2) && valid.sizes() == factor.sizes(),
              op, ": first must have shape [batch, q_len] and valid the factor's shape");
  Prepared p{query.contiguous(), source.contiguous(), factor.contiguous(), first.contiguous(), valid.contiguous()};
  // Every valid position must lie inside the source: the kernel reads those rows without further checks.
  const Tensor positions = p.first.unsqueeze(-1) + at::arange(factor.size(2), first.options());
  const Tensor outside = (positions < 0).logical_or(positions >= source.size(1)).logical_and(p.valid);
  TORCH_CHECK(!outside.any().item<bool>(), op, ": a valid window position lies outside the source");
  return p;
}

template <typename T>
void fill_inputs(WindowInputs<T>& a, const Prepared& p) {
  a.batch = p.query.size(0);
  a.q_len = p.query.size(1);
  a.src_len = p.source.size(1);
  a.hidden = p.query.size(2);
  a.width = p.factor.size(2);
  a.query = p.query.data_ptr<T>();
  a.source = p.source.data_ptr<T>();
  a.factor = p.factor.data_ptr<T>();
  a.first = p.first.data_ptr<int64_t>();
  a.valid = p.valid.data_ptr<bool>();
}

std::tuple<Tensor, Tensor> window_attention_cpu(const Tensor& query, const Tensor& source, const Tensor& factor,
                                                const Tensor& first, const Tensor& valid) {
  const Prepared p = prepare(query, source, factor, first, valid);
  Tensor context = at::empty(p.query.sizes(), p.query.options());
  Tensor probs = at::empty(p.factor.sizes(), p.factor.options());
  AT_DISPATCH_FLOATING_TYPES(p.query.scalar_type(), "window_attention", [&] {
    WindowForwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p);
    a.context = context.data_ptr<scalar_t>();
    a.probs = probs.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(window_attention_forward, a);
  });
  return {context, probs};
}

std::tuple<Tensor, Tensor, Tensor> window_attention_backward_cpu(const Tensor& grad_context, const Tensor& query,
                                                                 const Tensor& source, const Tensor& factor,
                                                                 const Tensor& first, const Tensor& valid,
                                                                 const Tensor& probs) {
  const Prepared p = prepare(query, source, factor, first, valid);
  TORCH_CHECK(grad_context.sizes() == query.sizes() && probs.sizes() == factor.sizes(),
              "window_attention_backward: grad_context and probs must come from the forward");
  const Tensor gc = grad_context.to(p.query.scalar_type()).contiguous(), pr = probs.contiguous();
  Tensor grad_query = at::empty(p.query.sizes(), p.query.options());
  Tensor grad_source = at::zeros(p.source.sizes(), p.source.options());
  Tensor grad_factor = at::empty(p.factor.sizes(), p.factor.options());
  AT_DISPATCH_FLOATING_TYPES(p.query.scalar_type(), "window_attention_backward", [&] {
    WindowBackwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p);
    a.probs = pr.data_ptr<scalar_t>();
    a.grad_context = gc.data_ptr<scalar_t>();
    a.grad_query = grad_query.data_ptr<scalar_t>();
    a.grad_source = grad_source.data_ptr<scalar_t>();
    a.grad_factor = grad_factor.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(window_attention_backward, a);
  });
  return {grad_query, grad_source, grad_factor};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // query [batch, q_len, hidden] attends to source rows first[b, t] + w for w < width where valid[b, t, w];
  // the softmax probabilities are multiplied by factor[b, t, w]. Returns (context, probabilities).
  m.def("window_attention(Tensor query, Tensor source, Tensor factor, Tensor first, Tensor valid) -> (Tensor, Tensor)");
  m.def(
      "window_attention_backward(Tensor grad_context, Tensor query, Tensor source, Tensor factor, Tensor first, "
      "Tensor valid, Tensor probs) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("window_attention", &fl::window_attention_cpu);
  m.impl("window_attention_backward", &fl::window_attention_backward_cpu);
}
