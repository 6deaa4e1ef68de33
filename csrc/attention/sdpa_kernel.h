// Fused scaled-dot-product attention kernels (flash style: tiles of queries against tiles of keys, an online
// softmax, the scores never stored). Torch-free: raw pointers with element strides.
//
// Tensors are viewed as [batch, heads, length, features]. Queries have q_heads heads, keys and values
// kv_heads (grouped-query attention: query head h reads key/value head h / (q_heads / kv_heads)).
#pragma once

#include "common/isa.h"

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fl {

struct Strides4 {
  int64_t batch = 0, head = 0, row = 0, col = 1;
};

struct SdpaSizes {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_dim = 0;
};

struct SdpaMasking {
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  // Optional user mask broadcast to [batch, q_heads, q_len, kv_len] through its strides (0 on broadcast dims):
  // a bool mask (true = may attend) or an additive float mask in the compute type.
  const bool* bool_mask = nullptr;
  const void* float_mask = nullptr;
  Strides4 mask_strides;
  double dropout_p = 0.0;
  uint64_t seed = 0;
};

// What the forward and the backward both read.
template <typename T>
struct SdpaInputs {
  SdpaSizes sizes;
  SdpaMasking masking;
  double scale = 1.0;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  Strides4 q_strides, k_strides, v_strides;  // col stride must be 1
};

template <typename T>
struct SdpaForwardArgs : SdpaInputs<T> {
  // Optional bfloat16 inputs (float forward only), with the strides above; with reads_bf16, q, k and v are unused:
  // the products read bf16 and accumulate in float on the GEMM engine's bf16 path (AMX or AVX512-BF16 through
  // oneDNN), probabilities rounded to bf16 for P V as torch's kernel does; the softmax stays float.
  bool reads_bf16 = false;  // the inputs are q16, k16 and v16 (null where a tensor is empty)
  const c10::BFloat16* q16 = nullptr;
  const c10::BFloat16* k16 = nullptr;
  const c10::BFloat16* v16 = nullptr;
  T* out = nullptr;  // [batch, q_heads, q_len, v_dim] at out_strides (rows contiguous)
  c10::BFloat16* out16 = nullptr;  // optional, in place of out: the output rounded to bf16 as it is written
  Strides4 out_strides;  // of out or out16, in elements
  // [batch, q_heads, q_len, 2]: each row's score maximum and the log of its sum of exp(score - maximum), kept
  // apart so the backward can rebuild probabilities exactly (maximum -inf: the row attends to nothing).
  T* lse = nullptr;
};

template <typename T>
struct SdpaBackwardArgs : SdpaInputs<T> {
  const T* out = nullptr;       // [batch, q_heads, q_len, v_dim] at out_strides (rows contiguous)
  const T* grad_out = nullptr;  // the same shape at grad_out_strides (rows contiguous)
  Strides4 out_strides, grad_out_strides;
  const T* lse = nullptr;
  T* grad_q = nullptr;     // [batch, q_heads, q_len, head_dim], contiguous
  T* grad_k = nullptr;     // [batch, kv_heads, kv_len, head_dim], contiguous
  T* grad_v = nullptr;     // [batch, kv_heads, kv_len, v_dim], contiguous
  T* grad_mask = nullptr;  // optional [batch, q_heads, q_len, kv_len], contiguous: dL/d(float mask)
};

}  // namespace fl

#define FL_SDPA_KERNEL_DECLS                                           \
  void sdpa_forward(const ::fl::SdpaForwardArgs<float>& args);         \
  void sdpa_forward(const ::fl::SdpaForwardArgs<double>& args);        \
  void sdpa_backward(const ::fl::SdpaBackwardArgs<float>& args);       \
  void sdpa_backward(const ::fl::SdpaBackwardArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_SDPA_KERNEL_DECLS)
