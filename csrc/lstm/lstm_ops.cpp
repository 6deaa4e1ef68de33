// The torch-facing layer of the LSTM family: op schemas, argument checks, allocation and CPU dispatch.
// Autograd and fake-tensor rules are registered in python/fusedlayers/_ops/lstm.py.
#include "lstm/lstm_kernel.h"

#include "common/derived_cache.h"
#include "common/gemm.h"
#include "common/reusable_tensor.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fl {

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_tensor(const Tensor& t, const char* name, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "lstm_layer: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, "lstm_layer: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "lstm_layer: ", name, " must have dtype ", dtype, " like input, got ",
                   t.scalar_type());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, "lstm_layer: ", name, " must have shape ", meaning, " = ", expected,
              ", got ", t.sizes());
}

// An initial state: [batch, size], or [1, batch, size] as a one-layer stack holds it (h_n and c_n then take the
// same shape, which saves the caller a slice and an unsqueeze of every small call).
void check_state(const Tensor& t, const char* name, at::ScalarType dtype, int64_t batch, int64_t size,
                 const char* meaning) {
  TORCH_CHECK(t.device().is_cpu(), "lstm_layer: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "lstm_layer: ", name, " must have dtype ", dtype, " like input, got ",
                   t.scalar_type());
  const bool shape_ok = (t.dim() == 2 || (t.dim() == 3 && t.size(0) == 1)) && t.size(-2) == batch &&
                        t.size(-1) == size;
  TORCH_CHECK(shape_ok, "lstm_layer: ", name, " must have shape ", meaning, " = [", batch, ", ", size,
              "] (or [1, ", batch, ", ", size, "]), got ", t.sizes());
}

struct Checked {
  LstmLayerSizes sizes;
  Tensor batch_sizes;  // int64, contiguous, CPU
};

Checked check_layer_args(const Tensor& input, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0,
                         const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                         const OptTensor& w_hr, bool reverse) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "lstm_layer: input must be float32, float64 or bfloat16, got ", dtype);
  check_tensor(input, "input", 2, dtype);
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong,
              "lstm_layer: batch_sizes must be a 1-D int64 CPU tensor, got ", batch_sizes.scalar_type(), " of shape ",
              batch_sizes.sizes(), " on ", batch_sizes.device());
  check_tensor(w_ih, "w_ih", 2, dtype);
  check_tensor(w_hh, "w_hh", 2, dtype);
  Checked out;
  LstmLayerSizes& s = out.sizes;
  s.input_size = input.size(1);
  s.rows = input.size(0);
  TORCH_CHECK(w_ih.size(0) % 4 == 0, "lstm_layer: w_ih must have shape [4 * hidden_size, input_size], got ",
              w_ih.sizes());
  s.hidden_size = w_ih.size(0) / 4;
  s.has_proj = w_hr.has_value() && w_hr->defined();
  s.output_size = s.has_proj ? w_hr->size(0) : s.hidden_size;
  s.reverse = reverse;
  check_shape(w_ih, "w_ih", {4 * s.hidden_size, s.input_size}, "[4 * hidden_size, input_size]");
  check_shape(w_hh, "w_hh", {4 * s.hidden_size, s.output_size}, "[4 * hidden_size, proj_size or hidden_size]");
  if (s.has_proj) {
    check_tensor(*w_hr, "w_hr", 2, dtype);
    check_shape(*w_hr, "w_hr", {s.output_size, s.hidden_size}, "[proj_size, hidden_size]");
  }
  const bool has_b_ih = b_ih.has_value() && b_ih->defined(), has_b_hh = b_hh.has_value() && b_hh->defined();
  TORCH_CHECK(has_b_ih == has_b_hh, "lstm_layer: b_ih and b_hh must be given together");
  s.has_bias = has_b_ih;
  if (s.has_bias) {
    check_tensor(*b_ih, "b_ih", 1, dtype);
    check_tensor(*b_hh, "b_hh", 1, dtype);
    check_shape(*b_ih, "b_ih", {4 * s.hidden_size}, "[4 * hidden_size]");
    check_shape(*b_hh, "b_hh", {4 * s.hidden_size}, "[4 * hidden_size]");
  }
  out.batch_sizes = batch_sizes.contiguous();
  const int64_t* bs = out.batch_sizes.data_ptr<int64_t>();
  s.steps = out.batch_sizes.numel();
  int64_t total = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    TORCH_CHECK(bs[t] >= 0 && (t == 0 || bs[t] <= bs[t - 1]),
                "lstm_layer: batch_sizes must be non-negative and non-increasing, got ", out.batch_sizes);
    total += bs[t];
  }
  TORCH_CHECK(total == s.rows, "lstm_layer: batch_sizes must sum to input.size(0) = ", s.rows, ", got ", total);
  s.batch = s.steps > 0 ? bs[0] : (h0.dim() >= 2 ? h0.size(-2) : 0);
  check_state(h0, "h0", dtype, s.batch, s.output_size, "[batch, proj_size or hidden_size]");
  check_state(c0, "c0", dtype, s.batch, s.hidden_size, "[batch, hidden_size]");
  return out;
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// Runs the kernel in float for bf16 tensors (the bf16 GEMM path is not wired into the LSTM kernel yet).
Tensor compute_view(const Tensor& t) {
  return t.defined() && t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t;
}

// A gate weight repacked into the kernel's GEMM panels, cached while the user's weight is unchanged.
Tensor packed_gate_weight(const Tensor& user_weight, const Tensor& weight, int64_t hidden) {
  const int64_t cols = weight.size(1);
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  // The key includes the dtype packed to: a bf16 weight computed in float32 packs differently.
  return cached_derived(user_weight, bf16 ? "lstm_gate_panels_bf16" : "lstm_gate_panels", [&] {
    Tensor out = at::empty({lstm_packed_weight_size(hidden, cols, bf16)}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "lstm_pack_weight", [&] {
      FL_DISPATCH_ISA(lstm_pack_weight, weight.data_ptr<scalar_t>(), hidden, cols, out.data_ptr<scalar_t>());
    });
    return out;
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_cpu(
    const Tensor& input_, const Tensor& batch_sizes, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_, bool reverse,
    bool train) {
  Checked checked = check_layer_args(input_, batch_sizes, h0_, c0_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, reverse);
  const LstmLayerSizes& s = checked.sizes;
  const auto out_dtype = input_.scalar_type();
  // bfloat16 runs natively (bf16 products, fp32 gates and cell state) except with a projection, or on a CPU
  // without native bf16 products (its scalar bf16 loop is ten times slower than float32): those compute in float32.
  const bool native = out_dtype != at::kBFloat16 || (!s.has_proj && gemm_bf16_native());
  auto view = [&](const Tensor& t) { return native ? t : compute_view(t); };
  const Tensor input = view(input_.contiguous()), h0 = view(h0_.contiguous()), c0 = view(c0_.contiguous()),
               w_ih = view(w_ih_.contiguous()), w_hh = view(w_hh_.contiguous()),
               b_ih = view(contiguous_or_undefined(b_ih_)), b_hh = view(contiguous_or_undefined(b_hh_)),
               w_hr = view(contiguous_or_undefined(w_hr_));
  const auto opts = input.options();
  const auto state_opts = opts.dtype(input.scalar_type() == at::kBFloat16 ? at::kFloat : input.scalar_type());
  // The output, saved gates and cells (and the backward's input gradient) come from the pool of reusable tensors:
  // a fresh tensor's pages fault on first write, and above 32 MiB (a 2-layer stack's gates) every call's are
  // fresh (4% of a training step).
  Tensor output = reusable_empty("lstm_output", {s.rows, s.output_size}, opts);
  Tensor h_n = at::empty(h0_.sizes(), opts);
  Tensor c_n = at::empty(c0_.sizes(), opts);
  const int64_t state_size = at::elementSize(state_opts.dtype().toScalarType());
  Tensor gates = reusable_empty("lstm_gates", {train ? s.rows : 0, lstm_gates_stride(s.hidden_size, state_size)},
                                state_opts);
  if (gates.size(1) > 4 * s.hidden_size) gates.narrow(1, 4 * s.hidden_size, gates.size(1) - 4 * s.hidden_size).zero_();
  Tensor cells = reusable_empty("lstm_cells", {train ? s.rows : 0, s.hidden_size}, state_opts);
  Tensor raw = at::empty({train && s.has_proj ? s.rows : 0, s.hidden_size}, state_opts);
  const Tensor w_ih_packed = packed_gate_weight(w_ih_, w_ih, s.hidden_size);
  const Tensor w_hh_packed = packed_gate_weight(w_hh_, w_hh, s.hidden_size);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "lstm_layer", [&] {
    using S = lstm_state_t<scalar_t>;
    LstmLayerForwardArgs<scalar_t> a;
    a.sizes = s;
    a.batch_sizes = checked.batch_sizes.data_ptr<int64_t>();
    a.input = input.data_ptr<scalar_t>();
    a.h0 = h0.data_ptr<scalar_t>();
    a.c0 = c0.data_ptr<scalar_t>();
    a.w_ih = w_ih.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.w_ih_packed = w_ih_packed.data_ptr<scalar_t>();
    a.w_hh_packed = w_hh_packed.data_ptr<scalar_t>();
    a.b_ih = b_ih.defined() ? b_ih.data_ptr<scalar_t>() : nullptr;
    a.b_hh = b_hh.defined() ? b_hh.data_ptr<scalar_t>() : nullptr;
    a.w_hr = w_hr.defined() ? w_hr.data_ptr<scalar_t>() : nullptr;
    a.output = output.data_ptr<scalar_t>();
    a.h_n = h_n.data_ptr<scalar_t>();
    a.c_n = c_n.data_ptr<scalar_t>();
    a.gates = train ? gates.data_ptr<S>() : nullptr;
    a.cells = train ? cells.data_ptr<S>() : nullptr;
    a.raw_hidden = train && s.has_proj ? raw.data_ptr<S>() : nullptr;
    FL_DISPATCH_ISA(lstm_layer_forward, a);
  });
  if (out_dtype != output.scalar_type()) {
    output = output.to(out_dtype);
    h_n = h_n.to(out_dtype);
    c_n = c_n.to(out_dtype);
  }
  return {output, h_n, c_n, gates, cells, raw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const Tensor& grad_output_, const Tensor& grad_h_n_, const Tensor& grad_c_n_, const Tensor& input_,
    const Tensor& batch_sizes, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_, const Tensor& w_hh_,
    const OptTensor& w_hr_, bool has_bias, const Tensor& output_, const Tensor& gates_, const Tensor& cells_,
    const Tensor& raw_, bool reverse) {
  Checked checked = check_layer_args(input_, batch_sizes, h0_, c0_, w_ih_, w_hh_, std::nullopt, std::nullopt,
                                     w_hr_, reverse);
  LstmLayerSizes s = checked.sizes;
  s.has_bias = has_bias;
  const auto out_dtype = input_.scalar_type();
  const Tensor input = compute_view(input_.contiguous()), h0 = compute_view(h0_.contiguous()),
               c0 = compute_view(c0_.contiguous()), w_ih = compute_view(w_ih_.contiguous()),
               w_hh = compute_view(w_hh_.contiguous()), w_hr = compute_view(contiguous_or_undefined(w_hr_)),
               output = compute_view(output_.contiguous()), grad_output = compute_view(grad_output_.contiguous()),
               grad_h_n = compute_view(grad_h_n_.contiguous()), grad_c_n = compute_view(grad_c_n_.contiguous()),
               cells = cells_.contiguous(), raw = raw_.contiguous();
  TORCH_CHECK(gates_.sizes() == at::IntArrayRef({s.rows, lstm_gates_stride(s.hidden_size, input.element_size())}) &&
                  cells.sizes() == at::IntArrayRef({s.rows, s.hidden_size}),
              "lstm_layer_backward: the saved gates and cells must come from lstm_layer(..., train=True)");
  TORCH_CHECK(grad_output.sizes() == output.sizes() && grad_h_n.sizes() == h0.sizes() && grad_c_n.sizes() == c0.sizes(),
              "lstm_layer_backward: gradients must have the shapes of output, h_n and c_n");
  const Tensor gates = gates_.contiguous();
  const auto opts = input.options();
  Tensor grad_input = reusable_empty("lstm_grad_input", {s.rows, s.input_size}, opts);
  Tensor grad_h0 = at::empty(h0_.sizes(), opts);
  Tensor grad_c0 = at::empty(c0_.sizes(), opts);
  Tensor grad_w_ih = at::empty({4 * s.hidden_size, s.input_size}, opts);
  Tensor grad_w_hh = at::empty({4 * s.hidden_size, s.output_size}, opts);
  Tensor grad_bias = at::empty({has_bias ? 4 * s.hidden_size : 0}, opts);
  Tensor grad_w_hr = at::empty({s.has_proj ? s.output_size : 0, s.has_proj ? s.hidden_size : 0}, opts);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward", [&] {
    LstmLayerBackwardArgs<scalar_t> a;
    a.sizes = s;
    a.batch_sizes = checked.batch_sizes.data_ptr<int64_t>();
    a.grad_output = grad_output.data_ptr<scalar_t>();
    a.grad_h_n = grad_h_n.data_ptr<scalar_t>();
    a.grad_c_n = grad_c_n.data_ptr<scalar_t>();
    a.input = input.data_ptr<scalar_t>();
    a.h0 = h0.data_ptr<scalar_t>();
    a.c0 = c0.data_ptr<scalar_t>();
    a.w_ih = w_ih.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.w_hr = w_hr.defined() ? w_hr.data_ptr<scalar_t>() : nullptr;
    a.output = output.data_ptr<scalar_t>();
    a.gates = gates.data_ptr<scalar_t>();
    a.cells = cells.data_ptr<scalar_t>();
    a.raw_hidden = s.has_proj ? raw.data_ptr<scalar_t>() : nullptr;
    a.grad_input = grad_input.data_ptr<scalar_t>();
    a.grad_h0 = grad_h0.data_ptr<scalar_t>();
    a.grad_c0 = grad_c0.data_ptr<scalar_t>();
    a.grad_w_ih = grad_w_ih.data_ptr<scalar_t>();
    a.grad_w_hh = grad_w_hh.data_ptr<scalar_t>();
    a.grad_bias = has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
    a.grad_w_hr = s.has_proj ? grad_w_hr.data_ptr<scalar_t>() : nullptr;
    // bf16 layers multiply their summed gradients in bf16 where the CPU does so natively (as the forward).
    a.bf16_products = out_dtype == at::kBFloat16 && !s.has_proj && gemm_bf16_native();
    FL_DISPATCH_ISA(lstm_layer_backward, a);
  });
  if (out_dtype != grad_input.scalar_type()) {
    for (Tensor* t : {&grad_input, &grad_h0, &grad_c0, &grad_w_ih, &grad_w_hh, &grad_bias, &grad_w_hr})
      *t = t->to(out_dtype);
  }
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // One layer, one direction of an LSTM over a packed sequence (see csrc/lstm/lstm_kernel.h). With
  // train=True it also returns what the backward needs: gates, cells and (with a projection) raw hidden.
  m.def(
      "lstm_layer(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, bool reverse, bool train) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor batch_sizes, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, bool has_bias, Tensor output, Tensor gates, "
      "Tensor cells, Tensor raw_hidden, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("lstm_layer", &fl::lstm_layer_cpu);
  m.impl("lstm_layer_backward", &fl::lstm_layer_backward_cpu);
}
