// fusedlayers::_gemm exposes the GEMM engine to Python, for its tests and its benchmark (not a public op).
#include "common/gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace fl {
namespace {

at::Tensor gemm_cpu(const at::Tensor& a_, const at::Tensor& b_, bool threaded) {
  TORCH_CHECK(a_.device().is_cpu() && b_.device().is_cpu(), "_gemm: a and b must be CPU tensors");
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(1) == b_.size(0),
              "_gemm: a must be [M, K] and b [K, N], got ", a_.sizes(), " and ", b_.sizes());
  TORCH_CHECK_TYPE(a_.scalar_type() == b_.scalar_type(), "_gemm: a and b must have the same dtype");
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  switch (a.scalar_type()) {
    case at::kFloat: {
      at::Tensor c = at::empty({M, N}, a.options());
      if (threaded)
        gemm_parallel(M, N, K, a.data_ptr<float>(), K, b.data_ptr<float>(), N, c.data_ptr<float>(), N, false);
      else
        gemm(M, N, K, a.data_ptr<float>(), K, b.data_ptr<float>(), N, c.data_ptr<float>(), N, false);
      return c;
    }
    case at::kDouble: {
      at::Tensor c = at::empty({M, N}, a.options());
      if (threaded)
        gemm_parallel(M, N, K, a.data_ptr<double>(), K, b.data_ptr<double>(), N, c.data_ptr<double>(), N, false);
      else
        gemm(M, N, K, a.data_ptr<double>(), K, b.data_ptr<double>(), N, c.data_ptr<double>(), N, false);
      return c;
    }
    case at::kBFloat16: {
      at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
      std::vector<bf16> packed(packed_b_bf16_size(K, N));
      pack_b_bf16(K, N, reinterpret_cast<const bf16*>(b.data_ptr()), N, packed.data());
      gemm_bf16(M, N, K, reinterpret_cast<const bf16*>(a.data_ptr()), K, packed.data(), N, 0,
                c.data_ptr<float>(), N, false);
      return c;
    }
    default:
      TORCH_CHECK_TYPE(false, "_gemm: dtype must be float32, float64 or bfloat16, got ", a.scalar_type());
  }
}

}  // namespace
}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  m.def("_gemm(Tensor a, Tensor b, bool threaded=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) { m.impl("_gemm", &fl::gemm_cpu); }
