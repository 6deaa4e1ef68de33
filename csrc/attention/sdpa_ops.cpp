// The torch-facing layer of fused attention: schemas, checks, dtype handling and CPU dispatch. The Python side
// (python/fusedlayers/functional/attention.py) reshapes any number of leading dims to [batch, heads] and
// broadcasts the mask to [batch, q_heads, q_len, kv_len] as a view before calling these ops.
#include "attention/sdpa_kernel.h"
#include "common/gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

namespace fl {

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Strides4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Inner dim contiguous (the GEMM engine's requirement); other strides are kept.
Tensor rows_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// [.., rows, row] with each row contiguous and rows at least a row apart (no broadcast rows, which the GEMM engine
// does not take); other strides are kept.
Tensor rows_apart(const Tensor& t) {
  return t.stride(-1) == 1 && t.stride(-2) >= t.size(-1) ? t : t.contiguous();
}

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

struct Prepared {
  SdpaSizes sizes;
  Tensor q, k, v, mask;  // in the compute type (bool masks stay bool)
};

// upcast: q, k and v in the compute type; else as given (bf16 inputs that the kernel reads directly).
Prepared prepare(const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
                 double dropout_p, int64_t window_left, int64_t window_right, bool upcast = true) {
  for (const auto& [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK(t->device().is_cpu(), "scaled_dot_product_attention: ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->dim() == 4, "scaled_dot_product_attention: ", name,
                " must be 4-D [batch, heads, length, features] here, got shape ", t->sizes());
  }
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "scaled_dot_product_attention: query must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(key.scalar_type() == dtype && value.scalar_type() == dtype,
                   "scaled_dot_product_attention: query, key and value must have the same dtype, got ", dtype, ", ",
                   key.scalar_type(), " and ", value.scalar_type());
  Prepared p;
  SdpaSizes& s = p.sizes;
  s.batch = query.size(0);
  s.q_heads = query.size(1);
  s.q_len = query.size(2);
  s.head_dim = query.size(3);
  s.kv_heads = key.size(1);
  s.kv_len = key.size(2);
  s.v_dim = value.size(3);
  TORCH_CHECK(key.size(0) == s.batch && value.size(0) == s.batch,
              "scaled_dot_product_attention: query, key and value must have the same batch size, got ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK(key.size(3) == s.head_dim, "scaled_dot_product_attention: key must have the query's embedding size ",
              s.head_dim, ", got ", key.size(3));
  TORCH_CHECK(value.size(1) == s.kv_heads && value.size(2) == s.kv_len,
              "scaled_dot_product_attention: value must have key's heads and length, got ", value.sizes(),
              " for key ", key.sizes());
  TORCH_CHECK((s.q_heads == 0 && s.kv_heads == 0) || (s.kv_heads > 0 && s.q_heads % s.kv_heads == 0),
              "scaled_dot_product_attention: the number of query heads (", s.q_heads,
              ") must be a multiple of the number of key/value heads (", s.kv_heads, ")");
  TORCH_CHECK(dropout_p >= 0 && dropout_p <= 1, "scaled_dot_product_attention: dropout_p must be in [0, 1], got ",
              dropout_p);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "scaled_dot_product_attention: window bounds must be >= 0 (or -1 for unbounded)");
  const auto ct = compute_type(dtype);
  p.q = rows_contiguous(upcast ? query.to(ct) : query);
  p.k = rows_contiguous(upcast ? key.to(ct) : key);
  p.v = rows_contiguous(upcast ? value.to(ct) : value);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.device().is_cpu(), "scaled_dot_product_attention: attn_mask must be a CPU tensor");
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == s.batch && mask.size(1) == s.q_heads && mask.size(2) == s.q_len &&
                    mask.size(3) == s.kv_len,
                "scaled_dot_product_attention: attn_mask must be broadcast to [batch, q_heads, q_len, kv_len] = [",
                s.batch, ", ", s.q_heads, ", ", s.q_len, ", ", s.kv_len, "], got ", mask.sizes());
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == dtype,
                     "scaled_dot_product_attention: attn_mask must be bool or have the query's dtype ", dtype,
                     ", got ", mask.scalar_type());
    p.mask = mask.scalar_type() == at::kBool ? mask : mask.to(ct);
  }
  return p;
}

SdpaMasking masking_of(const Prepared& p, bool is_causal, int64_t window_left, int64_t window_right,
                       double dropout_p, int64_t seed) {
  SdpaMasking m;
  m.causal = is_causal;
  m.window_left = window_left;
  m.window_right = window_right;
  m.dropout_p = dropout_p;
  m.seed = static_cast<uint64_t>(seed);
  if (p.mask.defined()) {
    m.mask_strides = strides_of(p.mask);
    if (p.mask.scalar_type() == at::kBool)
      m.bool_mask = p.mask.data_ptr<bool>();
    else
      m.float_mask = p.mask.data_ptr();
  }
  return m;
}

template <typename T>
void fill_inputs(SdpaInputs<T>& a, const Prepared& p, bool is_causal, int64_t window_left, int64_t window_right,
                 double dropout_p, int64_t seed, double scale) {
  a.sizes = p.sizes;
  a.masking = masking_of(p, is_causal, window_left, window_right, dropout_p, seed);
  a.scale = scale;
  if (p.q.scalar_type() == c10::CppTypeToScalarType<T>::value) {  // else bf16, set by the caller
    a.q = p.q.data_ptr<T>();
    a.k = p.k.data_ptr<T>();
    a.v = p.v.data_ptr<T>();
  }
  a.q_strides = strides_of(p.q);
  a.k_strides = strides_of(p.k);
  a.v_strides = strides_of(p.v);
}

// An output [batch, heads, q_len, v_dim] laid out in memory as the query is (its first three dims in the order of
// their strides, largest first, ties in dim order): a query sliced from a [len, batch, heads, dim] or
// [batch, len, heads, dim] projection gives an output that folds back to [len x batch, embed] or
// [batch x len, embed] as a view, as torch's own CPU kernel does for the second, instead of a copy.
// _ops/attention.py's fake kernel follows the same rule.
Tensor empty_in_query_layout(const Tensor& query, at::IntArrayRef sizes, const at::TensorOptions& options) {
  std::array<int64_t, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return query.stride(a) > query.stride(b); });
  const std::array<int64_t, 4> physical{sizes[order[0]], sizes[order[1]], sizes[order[2]], sizes[3]};
  std::array<int64_t, 4> back{};  // logical dim d sits at physical position back[d]
  for (int64_t p = 0; p < 3; ++p) back[order[p]] = p;
  back[3] = 3;
  return at::empty(physical, options).permute({back[0], back[1], back[2], back[3]});
}

std::tuple<Tensor, Tensor> sdpa_cpu(const Tensor& query, const Tensor& key, const Tensor& value,
                                    const OptTensor& attn_mask, double dropout_p, bool is_causal, double scale,
                                    int64_t window_left, int64_t window_right, int64_t seed) {
  // bf16 inputs are read as they are where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere
  // they are computed in float.
  const bool bf16_products = query.scalar_type() == at::kBFloat16 && gemm_bf16_native();
  Prepared p = prepare(query, key, value, attn_mask, dropout_p, window_left, window_right, !bf16_products);
  const SdpaSizes& s = p.sizes;
  const auto ct = compute_type(query.scalar_type());
  // bf16 products write a bf16 output directly (no float copy to round afterwards).
  Tensor out = empty_in_query_layout(query, {s.batch, s.q_heads, s.q_len, s.v_dim},
                                     p.q.options().dtype(bf16_products ? at::kBFloat16 : ct));
  Tensor lse = at::empty({s.batch, s.q_heads, s.q_len, 2}, p.q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "sdpa_forward", [&] {
    SdpaForwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p, is_causal, window_left, window_right, dropout_p, seed, scale);
    if constexpr (std::is_same_v<scalar_t, float>)
      if (bf16_products) {
        a.reads_bf16 = true;
        a.q16 = reinterpret_cast<const c10::BFloat16*>(p.q.const_data_ptr());
        a.k16 = reinterpret_cast<const c10::BFloat16*>(p.k.const_data_ptr());
        a.v16 = reinterpret_cast<const c10::BFloat16*>(p.v.const_data_ptr());
        a.out16 = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
      }
    if (!bf16_products) a.out = out.data_ptr<scalar_t>();
    a.out_strides = strides_of(out);
    a.lse = lse.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(sdpa_forward, a);
  });
  return {out.to(query.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sdpa_backward_cpu(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
    const Tensor& out, const Tensor& lse, double dropout_p, bool is_causal, double scale, int64_t window_left,
    int64_t window_right, int64_t seed, bool mask_grad) {
  Prepared p = prepare(query, key, value, attn_mask, dropout_p, window_left, window_right);
  const SdpaSizes& s = p.sizes;
  const auto ct = p.q.scalar_type();
  TORCH_CHECK(out.sizes() == at::IntArrayRef({s.batch, s.q_heads, s.q_len, s.v_dim}) &&
                  grad_out.sizes() == out.sizes(),
              "sdpa_backward: out and grad_out must have shape [batch, q_heads, q_len, v_dim]");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.batch, s.q_heads, s.q_len, 2}) && lse.scalar_type() == ct,
              "sdpa_backward: lse must come from the forward op");
  // Any layout whose rows are contiguous (the forward's output follows the query's layout, and so does its
  // gradient through the views that fold it back).
  const Tensor go = rows_apart(grad_out.to(ct)), o = rows_apart(out.to(ct)), l = lse.contiguous();
  Tensor grad_q = at::empty({s.batch, s.q_heads, s.q_len, s.head_dim}, p.q.options());
  Tensor grad_k = at::empty({s.batch, s.kv_heads, s.kv_len, s.head_dim}, p.q.options());
  Tensor grad_v = at::empty({s.batch, s.kv_heads, s.kv_len, s.v_dim}, p.q.options());
  const bool want_mask_grad = mask_grad && p.mask.defined() && p.mask.scalar_type() != at::kBool;
  Tensor grad_mask = want_mask_grad ? at::zeros({s.batch, s.q_heads, s.q_len, s.kv_len}, p.q.options())
                                    : at::empty({0}, p.q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sdpa_backward", [&] {
    SdpaBackwardArgs<scalar_t> a;
    fill_inputs<scalar_t>(a, p, is_causal, window_left, window_right, dropout_p, seed, scale);
    a.out = o.data_ptr<scalar_t>();
    a.grad_out = go.data_ptr<scalar_t>();
    a.out_strides = strides_of(o);
    a.grad_out_strides = strides_of(go);
    a.lse = l.data_ptr<scalar_t>();
    a.grad_q = grad_q.data_ptr<scalar_t>();
    a.grad_k = grad_k.data_ptr<scalar_t>();
    a.grad_v = grad_v.data_ptr<scalar_t>();
    a.grad_mask = want_mask_grad ? grad_mask.data_ptr<scalar_t>() : nullptr;
    FL_DISPATCH_ISA(sdpa_backward, a);
  });
  const auto dtype = query.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_mask.to(dtype)};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Inputs are [batch, heads, length, features]; attn_mask (bool, or additive in the query's dtype) is already
  // broadcast to [batch, q_heads, q_len, kv_len]. Returns the output and, per row, the score maximum and the log
  // of the sum of exponentials (compute type, [batch, q_heads, q_len, 2]) for the backward.
  m.def(
      "sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, bool is_causal, "
      "float scale, int window_left, int window_right, int seed) -> (Tensor, Tensor)",
      // the output's layout follows the query's: inductor must pass the query with the strides it was traced with
      {at::Tag::needs_exact_strides});
  m.def(
      "sdpa_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor out, "
      "Tensor lse, float dropout_p, bool is_causal, float scale, int window_left, int window_right, int seed, "
      "bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("sdpa", &fl::sdpa_cpu);
  m.impl("sdpa_backward", &fl::sdpa_backward_cpu);
}
