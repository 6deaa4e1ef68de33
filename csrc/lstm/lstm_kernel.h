// The fused LSTM layer kernels: one layer, one direction, the whole time loop. Torch-free: raw pointers to
// contiguous row-major buffers and sizes, so the same entry points can be built per ISA (and mirrored in CUDA).
//
// A sequence is stored packed, as torch.nn.utils.rnn.PackedSequence stores it: the rows of step t are rows
// [offset_t, offset_t + batch_sizes[t]) of an [N x features] matrix, batch sizes non-increasing. A padded
// [T, B, *] input is the packed case with every batch size equal to B.
#pragma once

#include "common/isa.h"

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fl {

// Row stride of the gates buffer ([N x stride], 4H used): 4H, plus one cache line when a row is a multiple of
// 512 bytes, so that the rows a GEMM reads together do not all map to the same cache sets.
// python/fusedlayers/_ops/lstm.py repeats this rule for fake tensors.
inline int64_t lstm_gates_stride(int64_t hidden, int64_t element_size) {
  const int64_t n = 4 * hidden;
  return (n * element_size) % 512 == 0 ? n + 64 / element_size : n;
}

struct LstmLayerSizes {
  int64_t steps = 0;        // T
  int64_t batch = 0;        // B = batch_sizes[0]
  int64_t rows = 0;         // N = sum of batch_sizes
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H (cell state width)
  int64_t output_size = 0;  // P = proj_size, or H without projection
  bool reverse = false;     // run from the last step to the first
  bool has_bias = false;
  bool has_proj = false;
};

// The type gates, cell states and GEMM accumulators are kept in: float for bfloat16 layers.
template <typename T>
struct LstmStateType {
  using type = T;
};
template <>
struct LstmStateType<c10::BFloat16> {
  using type = float;
};
template <typename T>
using lstm_state_t = typename LstmStateType<T>::type;

// Elements of a gate weight [4H x cols] repacked by lstm_pack_weight: bf16 panels pair rows (cols rounded up
// to even) for the dot-product instructions.
inline int64_t lstm_packed_weight_size(int64_t hidden, int64_t cols, bool bf16) {
  return 4 * hidden * (bf16 ? (cols + 1) / 2 * 2 : cols);
}

template <typename T>
struct LstmLayerForwardArgs {
  using S = lstm_state_t<T>;
  LstmLayerSizes sizes;
  const int64_t* batch_sizes = nullptr;  // [T]
  const T* input = nullptr;              // [N x I]
  const T* h0 = nullptr;                 // [B x P]
  const T* c0 = nullptr;                 // [B x H]
  const T* w_ih = nullptr;               // [4H x I], torch's layout and gate order
  const T* w_hh = nullptr;               // [4H x P]
  const T* b_ih = nullptr;               // [4H] or null
  const T* b_hh = nullptr;               // [4H] or null
  const T* w_hr = nullptr;               // [P x H] or null
  // Optional: w_ih and w_hh already repacked by lstm_pack_weight (skips the repacking).
  const T* w_ih_packed = nullptr;
  const T* w_hh_packed = nullptr;
  T* output = nullptr;                   // [N x P]
  T* h_n = nullptr;                      // [B x P]
  T* c_n = nullptr;                      // [B x H]
  // Kept for the backward pass (null in inference): gate activations (in the kernel's own column order),
  // cell states, and the cell outputs before the projection.
  S* gates = nullptr;                    // [N x lstm_gates_stride(H)]
  S* cells = nullptr;                    // [N x H]
  S* raw_hidden = nullptr;               // [N x H], only with a projection (not for bfloat16)
};

template <typename T>
struct LstmLayerBackwardArgs {
  LstmLayerSizes sizes;
  const int64_t* batch_sizes = nullptr;
  const T* grad_output = nullptr;  // [N x P]
  const T* grad_h_n = nullptr;     // [B x P]
  const T* grad_c_n = nullptr;     // [B x H]
  const T* input = nullptr;
  const T* h0 = nullptr;
  const T* c0 = nullptr;
  const T* w_ih = nullptr;
  const T* w_hh = nullptr;
  const T* w_hr = nullptr;
  const T* output = nullptr;       // the forward's output
  const T* gates = nullptr;        // the forward's saved gates (read only)
  const T* cells = nullptr;
  const T* raw_hidden = nullptr;
  T* grad_input = nullptr;         // [N x I]
  T* grad_h0 = nullptr;            // [B x P]
  T* grad_c0 = nullptr;            // [B x H]
  T* grad_w_ih = nullptr;          // [4H x I]
  T* grad_w_hh = nullptr;          // [4H x P]
  T* grad_bias = nullptr;          // [4H] or null: the gradient of b_ih and of b_hh alike
  T* grad_w_hr = nullptr;          // [P x H] or null
  // A bfloat16 layer computed in float (float backward only): the products that sum over all steps (grad_input
  // and the weight gradients) round their operands to bf16 and run on the bf16 GEMM, accumulating in float, as
  // torch's bf16 backward does. Inputs and weights are bf16 values already; the gate gradients are rounded.
  bool bf16_products = false;
};

}  // namespace fl

#define FL_LSTM_KERNEL_DECLS                                                     \
  /* Repacks a torch gate weight [4H x cols] into the kernel's GEMM panels (4H * cols elements). */ \
  void lstm_pack_weight(const float* w, int64_t hidden, int64_t cols, float* out);  \
  void lstm_pack_weight(const double* w, int64_t hidden, int64_t cols, double* out); \
  void lstm_pack_weight(const c10::BFloat16* w, int64_t hidden, int64_t cols, c10::BFloat16* out); \
  void lstm_layer_forward(const ::fl::LstmLayerForwardArgs<c10::BFloat16>& args); \
  void lstm_layer_forward(const ::fl::LstmLayerForwardArgs<float>& args);        \
  void lstm_layer_forward(const ::fl::LstmLayerForwardArgs<double>& args);       \
  void lstm_layer_backward(const ::fl::LstmLayerBackwardArgs<float>& args);      \
  void lstm_layer_backward(const ::fl::LstmLayerBackwardArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_LSTM_KERNEL_DECLS)
