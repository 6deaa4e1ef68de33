// The torch-facing layer of the affine coupling map: schemas, checks and CPU dispatch.
#include "flows/coupling_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fl {

namespace {

using at::Tensor;

// inputs [N, T, ...] and params [N, 2T, ...] with the same trailing dims, as contiguous [N, T*S], [N, 2*T*S].
std::pair<Tensor, Tensor> prepare(const Tensor& inputs, const Tensor& params) {
  constexpr const char* op = "coupling_affine";
  TORCH_CHECK(inputs.device().is_cpu() && params.device().is_cpu(), op, ": inputs and params must be CPU tensors");
  const auto dtype = inputs.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kFloat || dtype == at::kDouble) && params.scalar_type() == dtype, op,
                   ": inputs and params must both be float32 or both float64, got ", dtype, " and ",
                   params.scalar_type());
  TORCH_CHECK(inputs.dim() >= 2 && params.dim() == inputs.dim() && params.size(0) == inputs.size(0) &&
                  params.size(1) == 2 * inputs.size(1) && params.sizes().slice(2) == inputs.sizes().slice(2),
              op, ": params must have shape [batch, 2 * transformed features, ...] for inputs ", inputs.sizes(),
              ", got ", params.sizes());
  const int64_t batch = inputs.size(0);
  const int64_t per_row = c10::multiply_integers(inputs.sizes().slice(1));  // not -1: the batch may be empty
  return {inputs.contiguous().reshape({batch, per_row}), params.contiguous().reshape({batch, 2 * per_row})};
}

template <typename T>
CouplingArgs<T> args_of(const Tensor& x, const Tensor& p, bool inverse) {
  CouplingArgs<T> a;
  a.batch = x.size(0);
  a.elements = x.size(1);
  a.inverse = inverse;
  a.inputs = x.data_ptr<T>();
  a.params = p.data_ptr<T>();
  return a;
}

std::tuple<Tensor, Tensor> coupling_affine_cpu(const Tensor& inputs, const Tensor& params, bool inverse) {
  const auto [x, p] = prepare(inputs, params);
  Tensor outputs = at::empty_like(x), logabsdet = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coupling_affine", [&] {
    auto a = args_of<scalar_t>(x, p, inverse);
    a.outputs = outputs.data_ptr<scalar_t>();
    a.logabsdet = logabsdet.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(coupling_affine, a);
  });
  return {outputs.view(inputs.sizes()), logabsdet};
}

std::tuple<Tensor, Tensor> coupling_affine_backward_cpu(const Tensor& grad_outputs, const Tensor& grad_logabsdet,
                                                        const Tensor& inputs, const Tensor& params, bool inverse) {
  const auto [x, p] = prepare(inputs, params);
  TORCH_CHECK(grad_outputs.sizes() == inputs.sizes() && grad_logabsdet.numel() == x.size(0),
              "coupling_affine_backward: gradients of the wrong shape");
  const Tensor gy = grad_outputs.to(x.scalar_type()).contiguous().reshape(x.sizes());
  const Tensor gl = grad_logabsdet.to(x.scalar_type()).contiguous();
  Tensor grad_inputs = at::empty_like(x), grad_params = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coupling_affine_backward", [&] {
    auto a = args_of<scalar_t>(x, p, inverse);
    a.grad_outputs = gy.data_ptr<scalar_t>();
    a.grad_logabsdet = gl.data_ptr<scalar_t>();
    a.grad_inputs = grad_inputs.data_ptr<scalar_t>();
    a.grad_params = grad_params.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(coupling_affine_backward, a);
  });
  return {grad_inputs.view(inputs.sizes()), grad_params.view(params.sizes())};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // The affine coupling map with nflows' conventions: params = [shift; unconstrained scale] along dim 1,
  // scale = sigmoid(unconstrained + 2) + 1e-3. Returns (outputs, logabsdet), both directions in one pass.
  m.def("coupling_affine(Tensor inputs, Tensor params, bool inverse) -> (Tensor, Tensor)");
  m.def(
      "coupling_affine_backward(Tensor grad_outputs, Tensor grad_logabsdet, Tensor inputs, Tensor params, "
      "bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("coupling_affine", &fl::coupling_affine_cpu);
  m.impl("coupling_affine_backward", &fl::coupling_affine_backward_cpu);
}
