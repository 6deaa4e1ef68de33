// The torch-facing layer of fused additive attention: schemas, checks, dtype handling and CPU dispatch. Python
// (python/fusedlayers/functional/additive.py) projects queries and keys and broadcasts the mask to
// [batch, q_len, kv_len] as a view before calling these ops.
#include "attention/additive_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fl {

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

struct Prepared {
  Tensor q, k, score, value, mask;  // contiguous, in the compute type
};

Prepared prepare(const Tensor& query, const Tensor& key, const Tensor& score, const Tensor& value,
                 const OptTensor& mask, int64_t window_left, int64_t window_right) {
  constexpr const char* op = "additive_attention";
  for (const auto& [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&score, "score"}, {&value, "value"}})
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              op, ": query, key and value must be 3-D [batch, length, features], got ", query.sizes(), ", ",
              key.sizes(), " and ", value.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   op, ": query must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(key.scalar_type() == dtype && score.scalar_type() == dtype && value.scalar_type() == dtype,
                   op, ": query, key, score and value must have the same dtype, got ", dtype, ", ",
                   key.scalar_type(), ", ", score.scalar_type(), " and ", value.scalar_type());
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0),
              op, ": query, key and value must have the same batch size, got ", query.sizes(), ", ", key.sizes(),
              " and ", value.sizes());
  TORCH_CHECK(key.size(2) == query.size(2), op, ": projected keys must have the queries' hidden size ",
              query.size(2), ", got ", key.size(2));
  TORCH_CHECK(score.dim() == 1 && score.size(0) == query.size(2), op, ": score must have shape [",
              query.size(2), "], got ", score.sizes());
  TORCH_CHECK(value.size(1) == key.size(1), op, ": value must have one row per key (", key.size(1), "), got ",
              value.size(1));
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window bounds must be >= 0 (or -1 for unbounded)");
  const auto ct = compute_type(dtype);
  Prepared p{query.to(ct).contiguous(), key.to(ct).contiguous(), score.to(ct).contiguous(),
             value.to(ct).contiguous(), Tensor()};
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be a CPU tensor");
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be bool (true = may attend), got ",
                     mask->scalar_type());
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == query.size(0) && mask->size(1) == query.size(1) &&
                    mask->size(2) == key.size(1),
                op, ": mask must be broadcast to [batch, q_len, kv_len] = [", query.size(0), ", ", query.size(1),
                ", ", key.size(1), "], got ", mask->sizes());
    p.mask = *mask;
  }
  return p;
}

template <typename T>
void fill_inputs(AdditiveInputs<T>& a, const Prepared& p, int64_t window_left, int64_t window_right) {
  a.batch = p.q.size(0);
  a.q_len = p.q.size(1);
  a.kv_len = p.k.size(1);
  a.hidden = p.q.size(2);
  a.v_dim = p.value.size(2);
  a.q = p.q.data_ptr<T>();
  a.k = p.k.data_ptr<T>();
  a.score = p.score.data_ptr<T>();
  a.value = p.value.data_ptr<T>();
  if (p.mask.defined()) {
    a.mask = p.mask.data_ptr<bool>();
    a.mask_stride_batch = p.mask.stride(0);
    a.mask_stride_query = p.mask.stride(1);
    a.mask_stride_key = p.mask.stride(2);
  }
  a.window_left = window_left;
  a.window_right = window_right;
}

std::tuple<Tensor, Tensor> additive_attention_cpu(const Tensor& query, const Tensor& key, const Tensor& score,
                                                  const Tensor& value, const OptTensor& mask, int64_t window_left,
                                                  int64_t window_right) {
  const Prepared p = prepare(query, key, score, value, mask, window_left, window_right);
  const auto opts = p.q.options();
  Tensor context = at::empty({query.size(0), query.size(1), value.size(2)}, opts);
  Tensor weights = at::empty({query.size(0), query.size(1), key.size(1)}, opts);
  AT_DISPATCH_FLOATING_TYPES(p.q.scalar_type(), "additive_attention", [&] {
    AdditiveForwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p, window_left, window_right);
    a.context = context.data_ptr<scalar_t>();
    a.weights = weights.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(additive_attention_forward, a);
  });
  const auto dtype = query.scalar_type();
  return {context.to(dtype), weights.to(dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward_cpu(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query, const Tensor& key,
    const Tensor& score, const Tensor& value, const OptTensor& mask, const Tensor& weights, int64_t window_left,
    int64_t window_right) {
  const Prepared p = prepare(query, key, score, value, mask, window_left, window_right);
  const auto ct = p.q.scalar_type();
  const int64_t B = query.size(0), Tq = query.size(1), Tk = key.size(1);
  TORCH_CHECK(grad_context.sizes() == at::IntArrayRef({B, Tq, value.size(2)}),
              "additive_attention_backward: grad_context must have shape [batch, q_len, v_dim]");
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({B, Tq, Tk}),
              "additive_attention_backward: weights must come from the forward op");
  const Tensor gc = grad_context.to(ct).contiguous(), w = weights.to(ct).contiguous();
  Tensor gw;
  if (grad_weights.has_value() && grad_weights->defined()) {
    TORCH_CHECK(grad_weights->sizes() == weights.sizes(),
                "additive_attention_backward: grad_weights must have the weights' shape");
    gw = grad_weights->to(ct).contiguous();
  }
  Tensor grad_q = at::empty(p.q.sizes(), p.q.options());
  Tensor grad_k = at::zeros(p.k.sizes(), p.k.options());
  Tensor grad_score = at::empty(p.score.sizes(), p.score.options());
  Tensor grad_value = at::zeros(p.value.sizes(), p.value.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "additive_attention_backward", [&] {
    AdditiveBackwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p, window_left, window_right);
    a.weights = w.data_ptr<scalar_t>();
    a.grad_context = gc.data_ptr<scalar_t>();
    a.grad_weights = gw.defined() ? gw.data_ptr<scalar_t>() : nullptr;
    a.grad_q = grad_q.data_ptr<scalar_t>();
    a.grad_k = grad_k.data_ptr<scalar_t>();
    a.grad_score = grad_score.data_ptr<scalar_t>();
    a.grad_value = grad_value.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(additive_attention_backward, a);
  });
  const auto dtype = query.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_score.to(dtype), grad_value.to(dtype)};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // query [batch, q_len, hidden] and key [batch, kv_len, hidden] are already projected; score is v [hidden];
  // mask (bool, true = may attend) is broadcast to [batch, q_len, kv_len]. Returns (context, weights).
  m.def(
      "additive_attention(Tensor query, Tensor key, Tensor score, Tensor value, Tensor? mask, int window_left, "
      "int window_right) -> (Tensor, Tensor)");
  m.def(
      "additive_attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query, Tensor key, "
      "Tensor score, Tensor value, Tensor? mask, Tensor weights, int window_left, int window_right) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("additive_attention", &fl::additive_attention_cpu);
  m.impl("additive_attention_backward", &fl::additive_attention_backward_cpu);
}
