// The one-pass inverse of a masked affine autoregressive transform (MAF sampling, IAF density): with every
// layer's units sorted by degree, once x_1..x_k are known the units of degree k are computed in each layer,
// then feature k + 1 is solved. Each unit is computed once: the inverse costs one network pass of arithmetic
// instead of D. Torch-free: raw pointers and sizes.
#pragma once

#include "common/isa.h"

#include <atomic>
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

// The forward pass (density direction) and its backward, on samples in row-major slabs. A layer here is one
// stage of the list above without batch norm: a = act_in ? act(src) : src; z = a Wt + bias + context;
// dst = [residual +] act_out?(z). Output unit u reads only the inputs [0, extent[u]) (its mask row, in sorted
// order), so the products skip the masked-out blocks.
template <typename T>
struct MadeLayer {
  int64_t src = 0, residual = -1;  // buffer ids: 0 is x, buffer i + 1 is layer i's dst
  int64_t in_units = 0, out_units = 0;
  bool act_in = false, act_out = false;
  const T* weight_t = nullptr;     // [in_units, out_units]
  const T* weight = nullptr;       // [out_units, in_units] (the backward's dA = dZ W)
  const T* bias = nullptr;         // [out_units] or null
  const T* context = nullptr;      // [batch, out_units] or null
  const int64_t* extent = nullptr; // [out_units], non-decreasing
  // float, on CPUs whose build runs the strip kernel (flows/made_strips.h), else null: the weight packed once by
  // the op layer (made_pack_strips) as the forward's W^T over output units and the backward's W over input units.
  const float* output_strips = nullptr;
  const float* input_strips = nullptr;
  // Saved by the forward, read by the backward ([batch, units] each): the layer's output and its
  // pre-activation output (act_out only). An activated input is recomputed from its source.
  T* dst = nullptr;
  T* pre = nullptr;
};

template <typename T>
struct MadeForwardArgs {
  int64_t batch = 0, features = 0, num_layers = 0;
  int activation = 0;
  T epsilon = T(1e-3);
  const MadeLayer<T>* layers = nullptr;  // the last is the output layer (2 rows per feature): the params
  bool save = true;  // keep every activation for the backward (else the saved pointers are unused)
  const T* inputs = nullptr;       // [batch, features]
  T* outputs = nullptr;            // [batch, features]: scale * x + shift
  T* logabsdet = nullptr;          // [batch]
  std::atomic<bool>* nonfinite_inputs = nullptr;  // set when an input is NaN or infinite (the op raises)
  // An affine coupling's conditioner instead (made_coupling_forward): inputs and outputs are [batch,
  // coupled_features]; the network reads the `features` identity columns and returns [shift; unconstrained
  // scale] for the `moving_features` moving ones, which the epilogue maps as flows/coupling_kernel.h says; the
  // identity columns are copied. NaN passes through.
  enum class Map : int { maf = 0, coupling_forward = 1, coupling_inverse = 2 } map = Map::maf;
  int64_t coupled_features = 0, moving_features = 0;
  const int64_t* identity_index = nullptr;  // [features]
  const int64_t* moving_index = nullptr;    // [moving_features]
};

template <typename T>
struct MadeBackwardArgs {
  int64_t batch = 0, features = 0, num_layers = 0;
  int activation = 0;
  T epsilon = T(1e-3);
  const MadeLayer<T>* layers = nullptr;
  const T* inputs = nullptr;
  const T* grad_outputs = nullptr;    // [batch, features]
  const T* grad_logabsdet = nullptr;  // [batch]
  T* grad_inputs = nullptr;           // [batch, features], or null: x needs no gradient (its layer's dA is skipped)
  // Per layer [out_units, in_units] in the module's unit order, masked: grad_weight[l][out_perm[l][o], in_perm[l][i]]
  // = mask[l][same] * dW_sorted[o, i] (the kernel writes them there directly, so that the op layer has no pass to
  // unsort them; every entry is written).
  T* const* grad_weight = nullptr;
  const int64_t* const* out_perm = nullptr;  // per layer [out_units]: module unit of sorted output unit o
  const int64_t* const* in_perm = nullptr;   // per layer [in_units]: module unit of sorted input unit i
  const T* const* mask = nullptr;            // per layer [out_units, in_units], the module's order
  T* const* grad_bias = nullptr;      // per layer [out_units] or null
  T* const* grad_context = nullptr;   // per layer [batch, out_units] or null
};

// made_strip_floats: how many floats made_pack_strips writes for a layer (sorted weight [out_units, in_units]),
// 0 where this build packs no strips (then the kernels take the GEMM engine).

}  // namespace fl

#define FL_MADE_KERNEL_DECLS                                            \
  void made_strip_floats(int64_t in_units, int64_t out_units, const int64_t* extent, bool over_inputs, \
                         int64_t& floats);                                 \
  void made_pack_strips(const float* sorted_weight, int64_t in_units, int64_t out_units, const int64_t* extent, \
                        bool over_inputs, float* out);                     \
  void made_inverse(const ::fl::MadeInverseArgs<float>& args);          \
  void made_inverse(const ::fl::MadeInverseArgs<double>& args);         \
  void made_forward(const ::fl::MadeForwardArgs<float>& args);          \
  void made_forward(const ::fl::MadeForwardArgs<double>& args);         \
  void made_backward(const ::fl::MadeBackwardArgs<float>& args);        \
  void made_backward(const ::fl::MadeBackwardArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_MADE_KERNEL_DECLS)
