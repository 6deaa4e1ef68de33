// The affine map and log-determinant of an affine coupling layer (Real NVP, nflows' conventions), both
// directions in one pass over the conditioner's outputs. Torch-free: raw contiguous pointers and sizes.
//   params[n] = [shift (T x S); unconstrained scale (T x S)], scale = sigmoid(unconstrained + 2) + epsilon
//   forward: y = x * scale + shift, logabsdet = sum log scale; inverse: y = (x - shift) / scale, -sum log scale
#pragma once

#include "common/isa.h"

#include <cstdint>

namespace fl {

template <typename T>
struct CouplingArgs {
  int64_t batch = 0, elements = 0;  // per row: T transformed features x S positions
  bool inverse = false;
  T epsilon = T(1e-3);
  const T* inputs = nullptr;  // [batch, elements]: the features being transformed
  const T* params = nullptr;  // [batch, 2 * elements]
  T* outputs = nullptr;       // [batch, elements]
  T* logabsdet = nullptr;     // [batch]
  // Backward only (null in the forward): gradients in, gradients out.
  const T* grad_outputs = nullptr;    // [batch, elements]
  const T* grad_logabsdet = nullptr;  // [batch]
  T* grad_inputs = nullptr;           // [batch, elements]
  T* grad_params = nullptr;           // [batch, 2 * elements]
};

}  // namespace fl

#define FL_COUPLING_KERNEL_DECLS                                      \
  void coupling_affine(const ::fl::CouplingArgs<float>& args);          \
  void coupling_affine(const ::fl::CouplingArgs<double>& args);         \
  void coupling_affine_backward(const ::fl::CouplingArgs<float>& args); \
  void coupling_affine_backward(const ::fl::CouplingArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_COUPLING_KERNEL_DECLS)
