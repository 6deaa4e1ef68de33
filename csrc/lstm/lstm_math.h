// The LSTM cell's per-element math, over a value type V: float, double, or a SIMD vector of them (the CPU
// kernels) and, later, the CUDA kernels. Gate order is torch's: input, forget, cell (g), output.
#pragma once

#include "common/scalar_math.h"

namespace fl {

template <typename V>
FL_HOST_DEVICE V sigmoid_(const V& x) {
  return V(1) / (V(1) + exp_(V(0) - x));
}

// From the four gate pre-activations and the previous cell state: the gate activations, the new cell state
// and the cell output h = o * tanh(c).
template <typename V>
FL_HOST_DEVICE void lstm_cell_forward_math(const V& pre_i, const V& pre_f, const V& pre_g, const V& pre_o,
                                           const V& c_prev, V& i, V& f, V& g, V& o, V& c, V& h) {
  i = sigmoid_(pre_i);
  f = sigmoid_(pre_f);
  g = tanh_(pre_g);
  o = sigmoid_(pre_o);
  c = f * c_prev + i * g;
  h = o * tanh_(c);
}

// Backward of lstm_cell_forward_math: from dL/dh and dL/dc (the cell state's gradient from the next step), the
// gradients of the four pre-activations and of c_prev. tanh(c) is recomputed rather than stored.
template <typename V>
FL_HOST_DEVICE void lstm_cell_backward_math(const V& dh, const V& dc, const V& i, const V& f, const V& g,
                                            const V& o, const V& c, const V& c_prev, V& dpre_i, V& dpre_f,
                                            V& dpre_g, V& dpre_o, V& dc_prev) {
  const V one(1);
  const V tc = tanh_(c);
  const V dc_total = dc + dh * o * (one - tc * tc);
  dpre_i = dc_total * g * i * (one - i);
  dpre_f = dc_total * c_prev * f * (one - f);
  dpre_g = dc_total * i * (one - g * g);
  dpre_o = dh * tc * o * (one - o);
  dc_prev = dc_total * f;
}

}  // namespace fl
