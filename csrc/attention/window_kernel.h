// Fused attention over one window of consecutive source rows per query (Luong's local-p attention): scores are
// dot products of the query with the rows first .. first + width - 1, softmax over the valid ones, the
// probabilities multiplied by a per-position factor (the Gaussian around the predicted position), and the
// context the weighted sum of the rows. Nothing of size [batch, queries, width, hidden] is built.
#pragma once

#include "common/isa.h"

#include <cstdint>

namespace fl {

template <typename T>
struct WindowInputs {
  int64_t batch = 0, q_len = 0, src_len = 0, hidden = 0, width = 0;
  const T* query = nullptr;    // [batch, q_len, hidden]
  const T* source = nullptr;   // [batch, src_len, hidden]
  const T* factor = nullptr;   // [batch, q_len, width]: multiplies the softmax probabilities
  const int64_t* first = nullptr;  // [batch, q_len]: the window's first source row (may lie outside the source)
  const bool* valid = nullptr;     // [batch, q_len, width]: only valid positions are read (all inside the source)
};

template <typename T>
struct WindowForwardArgs : WindowInputs<T> {
  T* context = nullptr;  // [batch, q_len, hidden]
  T* probs = nullptr;    // [batch, q_len, width]: the softmax (zero where invalid; all zero if none is valid)
};

template <typename T>
struct WindowBackwardArgs : WindowInputs<T> {
  const T* probs = nullptr;
  const T* grad_context = nullptr;  // [batch, q_len, hidden]
  T* grad_query = nullptr;          // [batch, q_len, hidden]
  T* grad_source = nullptr;         // [batch, src_len, hidden], zeroed by the caller
  T* grad_factor = nullptr;         // [batch, q_len, width]
};

}  // namespace fl

#define FL_WINDOW_KERNEL_DECLS                                                \
  void window_attention_forward(const ::fl::WindowForwardArgs<float>& args);   \
  void window_attention_forward(const ::fl::WindowForwardArgs<double>& args);  \
  void window_attention_backward(const ::fl::WindowBackwardArgs<float>& args); \
  void window_attention_backward(const ::fl::WindowBackwardArgs<double>& args);

FL_DECLARE_FOR_EACH_ISA(FL_WINDOW_KERNEL_DECLS)
