// Fused additive (Bahdanau) attention kernels: score(i, j) = v . tanh(q_i + k_j) over projected queries and
// keys, a masked softmax over keys, context = weights @ values. The [batch, queries, keys, hidden] tanh tensor
// is never stored: the backward recomputes it. Torch-free: raw contiguous pointers and sizes.
#pragma once

#include "common/isa.h"

#include <cstdint>

namespace fl {

template <typename T>
struct AdditiveInputs {
  int64_t batch = 0, q_len = 0, kv_len = 0, hidden = 0, v_dim = 0;
  const T* q = nullptr;      // projected queries [batch, q_len, hidden]
  const T* k = nullptr;      // projected keys [batch, kv_len, hidden]
  const T* score = nullptr;  // the score vector v [hidden]
  const T* value = nullptr;  // [batch, kv_len, v_dim]
  // Optional bool mask (true = may attend) read through strides over (batch, query, key); 0 on broadcast dims.
  const bool* mask = nullptr;
  int64_t mask_stride_batch = 0, mask_stride_query = 0, mask_stride_key = 0;
  // Keys query i may see: i - window_left .. i + window_right (-1: unbounded); keys outside are never touched.
  int64_t window_left = -1, window_right = -1;
};

template <typename T>
struct AdditiveForwardArgs : AdditiveInputs<T> {
  T* context = nullptr;  // [batch, q_len, v_dim]
  T* weights = nullptr;  // [batch, q_len, kv_len]; a query with no key to attend gets zero weights and context
};

template <typename T>
struct AdditiveBackwardArgs : AdditiveInputs<T> {
  const T* weights = nullptr;        // from the forward
  const T* grad_context = nullptr;   // [batch, q_len, v_dim]
  const T* grad_weights = nullptr;   // optional [batch, q_len, kv_len]
  T* grad_q = nullptr;               // [batch, q_len, hidden]
  T* grad_k = nullptr;               // [batch, kv_len, hidden]
  T* grad_score = nullptr;           // [hidden]
  T* grad_value = nullptr;           // [batch, kv_len, v_dim]
};

}  // namespace fl

#define FL_ADDITIVE_KERNEL_DECLS                                               \
  void additive_attention_forward(const ::fl::AdditiveForwardArgs<float>& args);   \
  void additive_attention_forward(const ::fl::AdditiveForwardArgs<double>& args);  \
  void additive_attention_backward(const ::fl::AdditiveBackwardArgs<float>& args); \
  void additive_attention_backward(const ::fl::AdditiveBackwardArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_ADDITIVE_KERNEL_DECLS)
