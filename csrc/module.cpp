// The Python module fusedlayers._C. Loading it registers every op (TORCH_LIBRARY blocks in the *_ops.cpp
// files); the pybind11 functions here report how the extension was built and what it runs with.
#include "common/derived_cache.h"
#include "common/reusable_tensor.h"
#include "common/gemm.h"
#include "common/isa.h"
#include "common/parallel.h"
#include "common/peak.h"

#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedlayers compiled kernels";
  m.def("built_with_torch", [] { return std::string(FL_TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("isa", [] { return std::string(fl::isa_name(fl::active_isa())); },
        "The instruction set the CPU kernels run with (FUSEDLAYERS_ISA can lower it).");
  m.def("best_isa", [] { return std::string(fl::isa_name(fl::best_supported_isa())); });
  m.def("gemm_backend", [] { return std::string(fl::gemm_backend()); });
  m.def("bf16_native", &fl::gemm_bf16_native,
        "Whether bfloat16 products run natively (AVX512-BF16); otherwise bfloat16 layers compute in float32.");
  m.def("num_threads", [] { return fl::num_threads(); });
  m.def("cuda_built", [] { return false; });
  m.def("set_weight_cache_enabled", &fl::set_derived_cache_enabled, py::arg("enabled"));
  m.def("weight_cache_enabled", &fl::derived_cache_enabled);
  m.def("_pooled_bytes", &fl::reusable_pooled_bytes, "Bytes held by the pool of saved activations (tests).");
  m.def("clear_weight_cache", [] {
    fl::clear_derived_cache();
    fl::clear_reusable_tensors();
  });
  m.def("measure_peak_gflops", &fl::measure_peak_gflops, py::arg("kind") = "fp32", py::arg("threads") = 1,
        py::arg("seconds") = 1.0, py::call_guard<py::gil_scoped_release>(),
        "Measured multiply-add peak of this CPU in GFLOP/s over `threads` threads.");
}
