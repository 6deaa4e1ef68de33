// Scalar math shared by CPU and CUDA kernels. The per-element formulas (lstm_math.h, ...) are templates over a
// value type V and call exp_/tanh_ unqualified: these overloads serve V = float/double, and vec_math.h adds
// overloads for SIMD vectors on the CPU.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fl {

FL_HOST_DEVICE float exp_(float x) { return ::expf(x); }
FL_HOST_DEVICE double exp_(double x) { return ::exp(x); }
FL_HOST_DEVICE float tanh_(float x) { return ::tanhf(x); }
FL_HOST_DEVICE double tanh_(double x) { return ::tanh(x); }

}  // namespace fl
