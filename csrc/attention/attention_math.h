// Per-element pieces of fused attention shared by the CPU and CUDA kernels: which (query, key) pairs a
// causal / banded mask allows, and the dropout decision for one pair, a pure function of (seed, index) so the
// backward pass can redraw the forward's mask instead of storing it.
#pragma once

#include "common/scalar_math.h"

#include <cstdint>

namespace fl {

// Keys query i may attend to, from the structural masks alone: [first, last] (last < first: none).
// Causal is aligned as torch aligns it (top-left: query i sees keys 0..i); a window (left, right) keeps keys
// i - left .. i + right; a negative bound is unbounded.
struct KeyRange {
  int64_t first, last;
};

FL_HOST_DEVICE KeyRange allowed_keys(int64_t i, int64_t kv_len, bool causal, int64_t left, int64_t right) {
  int64_t first = 0, last = kv_len - 1;
  if (causal && i < last) last = i;
  // Compared as distances: i + right or i - left could overflow for bounds near the int64 limits.
  if (right >= 0 && right < last - i) last = i + right;
  if (left >= 0 && left < i - first) first = i - left;
  return {first, last};
}

// A 32-bit hash with good avalanche (Chris Wellons' lowbias32), used as a counter-based random stream.
FL_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Whether element `index` of the attention probabilities survives dropout: uniform on 24 bits, compared with
// the drop threshold p * 2^24.
FL_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold24) {
  const uint32_t lo = static_cast<uint32_t>(index), hi = static_cast<uint32_t>(index >> 32);
  const uint32_t stream = mix32(static_cast<uint32_t>(seed) ^ mix32(hi ^ static_cast<uint32_t>(seed >> 32)));
  return (mix32(lo ^ stream) >> 8) >= threshold24;
}

}  // namespace fl

namespace fl {

// Additive (Bahdanau) attention, one hidden unit of one (query, key) pair: the score gains v * t with
// t = tanh(q + k). With g the score's gradient, dv gains g * t and dq, dk gain v * g * (1 - t^2); kernels sum
// additive_unit_grad over keys (or queries) and multiply by v once at the end.
template <typename V>
FL_HOST_DEVICE V additive_unit(const V& q, const V& k) {
  return tanh_(q + k);
}
template <typename V>
FL_HOST_DEVICE V additive_unit_grad(const V& g, const V& t) {
  return g - g * t * t;
}

}  // namespace fl
