// fusedlayers::linear: y = x W^T + b on the GEMM engine (torch.matmul reaches well under half of this chip's
// peak). The weight is kept transposed in the derived-weight cache, so repeated calls with an unchanged weight
// skip the transposition. Used for the projections of the attention layers.
#include "common/derived_cache.h"
#include "common/gemm.h"
#include "common/transpose_dispatch.h"
#include "common/parallel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace fl {
namespace {

using at::Tensor;

void check_linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "linear: input and weight must be CPU tensors");
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "linear: input's last dimension (",
              input.dim() >= 1 ? input.size(-1) : 0, ") must equal weight's in_features (", weight.size(1), ")");
  TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type() &&
                       (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble),
                   "linear: input and weight must both be float32 or float64, got ", input.scalar_type(), " and ",
                   weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "linear: bias must have the input's dtype");
  }
}

template <typename T>
void linear_impl(const T* x, const T* w_t, int64_t ld_w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  if (bias != nullptr)
    gemm_parallel_bias(M, N, K, x, K, w_t, ld_w, bias, y, N);
  else
    gemm_parallel(M, N, K, x, K, w_t, ld_w, y, N, false);
}

Tensor linear_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_linear(input, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  const Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const Tensor w = weight.contiguous();
  // [K x ld] with ld padded off multiples of 512 bytes, so the GEMM's panel rows spread over cache sets.
  const int64_t ld = (N * w.element_size()) % 512 == 0 ? N + 64 / w.element_size() : N;
  const Tensor w_t = cached_derived(weight, "linear_transposed", [&] {
    Tensor out = at::empty({K, ld}, w.options());
    out.narrow(1, 0, N).copy_(w.t());
    return out;
  });
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = N;
  Tensor y = at::empty({M, N}, x.options());
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear", [&] {
    linear_impl(x.data_ptr<scalar_t>(), w_t.data_ptr<scalar_t>(), ld, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                y.data_ptr<scalar_t>(), M, K, N);
  });
  return y.view(out_shape);
}

// Gradients of x, W and b; the input's only where input_grad (a first layer's input seldom needs one: its
// product is a third of the backward).
std::tuple<Tensor, Tensor, Tensor> linear_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                       const Tensor& weight, bool bias_grad, bool input_grad) {
  check_linear(input, weight, std::nullopt);
  const int64_t K = weight.size(1), N = weight.size(0);
  const Tensor x = input.reshape({-1, K}).contiguous();
  const Tensor g = grad_out.reshape({-1, N}).contiguous();
  const Tensor w = weight.contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(g.size(0) == M, "linear_backward: grad_out must have the output's shape");
  Tensor grad_input = at::empty({input_grad ? M : 0, K}, x.options());
  Tensor grad_weight = at::empty({N, K}, x.options());
  Tensor grad_bias = at::empty({bias_grad ? N : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_backward", [&] {
    using T = scalar_t;
    if (input_grad)
      gemm_parallel(M, K, N, g.data_ptr<T>(), N, w.data_ptr<T>(), K, grad_input.data_ptr<T>(), K, false);
    // g transposed, rows padded off multiples of 512 bytes: at a 4 KiB stride every row of a transposed tile
    // would land in the same cache set.
    const int64_t ld = (M * int64_t(sizeof(T))) % 512 == 0 ? M + 64 / int64_t(sizeof(T)) : M;
    Tensor g_t = at::empty({N, ld}, x.options());
    constexpr int64_t kCols = 64;
    parallel_for((N + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      const int64_t c0 = begin * kCols, c1 = std::min(N, end * kCols);
      FL_DISPATCH_ISA(transposed_copy, M, c1 - c0, g.data_ptr<T>() + c0, N, g_t.data_ptr<T>() + c0 * ld, ld);
    });
    gemm_parallel(N, K, M, g_t.data_ptr<T>(), ld, x.data_ptr<T>(), K, grad_weight.data_ptr<T>(), K, false);
    if (bias_grad) {  // column sums of g, the rows added in order: a loop over columns runs in vector lanes (a
      // sum along each row of g^T was one dependent add per element)
      const T* gp = g.data_ptr<T>();
      T* gb = grad_bias.data_ptr<T>();
      constexpr int64_t kBlock = 256;
      parallel_for((N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
        const int64_t c0 = begin * kBlock, c1 = std::min(N, end * kBlock);
        std::fill(gb + c0, gb + c1, T(0));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = c0; n < c1; ++n) gb[n] += gp[m * N + n];
      });
    }
  });
  return {input_grad ? grad_input.view(input.sizes()) : grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad_out, Tensor input, Tensor weight, bool bias_grad, bool input_grad=True) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("linear", &fl::linear_cpu);
  m.impl("linear_backward", &fl::linear_backward_cpu);
}
