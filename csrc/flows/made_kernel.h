// The one-pass inverse of a masked affine autoregressive transform (MAF sampling, IAF density): with every
// layer's units sorted by degree, once x_1..x_k are known the units of degree k are computed in each layer,
// then feature k + 1 is solved. Each unit is computed once: the inverse costs one network pass of arithmetic
// instead of D. Torch-free: raw pointers and sizes.
#pragma once

#include "common/isa.h"

#include <cstdint>

namespace fl {

// One masked linear layer of the MADE and what surrounds it, all in degree-sorted unit order:
//   a   = act_in ? act(in_scale * src + in_shift) : in_scale * src + in_shift   (scale/shift optional)
//   z   = weight a + bias + context
//   dst = [residual +] act_out?(out_scale * z + out_shift)
// Units of degree k are rows [out_offsets[k], out_offsets[k + 1]); they read the inputs of degree <= k, the
// columns [0, in_offsets[k + 1]). Buffers are numbered: 0 holds x, the others hidden activations.
template <typename T>
struct MadeStage {
  int64_t src = 0, dst = 1, residual = -1;
  int64_t in_units = 0, out_units = 0;
  const T* weight = nullptr;  // [out_units, in_units], masked
  const T* bias = nullptr;
  const T* in_scale = nullptr;
  const T* in_shift = nullptr;
  bool act_in = false;
  const T* out_scale = nullptr;
  const T* out_shift = nullptr;
  bool act_out = false;
  const T* context = nullptr;  // [out_units, batch], added before out_scale
  const int64_t* in_offsets = nullptr;   // [features + 2]
  const int64_t* out_offsets = nullptr;  // [features + 2]
};

template <typename T>
struct MadeInverseArgs {
  int64_t batch = 0, features = 0, num_stages = 0, num_buffers = 0;
  int activation = 0;  // MadeActivation
  T epsilon = T(1e-3);
  // The last stage is the output layer: two rows per feature (unconstrained scale, shift), no activation.
  const MadeStage<T>* stages = nullptr;
  const int64_t* buffer_units = nullptr;  // rows of each buffer; buffer 0 has `features`
  const T* targets = nullptr;  // [batch, features]: y of y = scale * x + shift
  T* outputs = nullptr;        // [batch, features]: x
  T* logabsdet = nullptr;      // [batch]: -sum log scale
};

}  // namespace fl

#define FL_MADE_KERNEL_DECLS                                      \
  void made_inverse(const ::fl::MadeInverseArgs<float>& args);    \
  void made_inverse(const ::fl::MadeInverseArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_MADE_KERNEL_DECLS)
