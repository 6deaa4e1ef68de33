// CPU kernels of fused additive attention (see additive_kernel.h). Built once per ISA.
//
// Forward: a work item is a block of query rows of one batch. Each row's scores are computed four keys at a
// time (the query row and v are loaded once for the four) over the keys its window and mask allow, then a
// softmax; the block's context is one GEMM over the span of keys its rows see.
//
// Backward: dW = dC V^T (+ the weights' own gradient) and dV = W^T dC are GEMMs over each block's key span; the
// score gradient ds = w (dW - w.dW) then drives a second tanh pass that accumulates dq, dk and dv. A work item
// owns whole batches when there are enough of them; otherwise a batch is split into row chunks that write dk
// and dV into their own buffers, summed at the end.
#include "attention/additive_kernel.h"

// vec_math.h first: the formulas in attention_math.h find its SIMD overloads by ordinary lookup.
#include "common/vec_math.h"

#include "attention/attention_math.h"
#include "common/gemm.h"
#include "common/transpose_kernel.h"
#include "common/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fl::FL_ISA {

namespace {

using at::vec::Vectorized;

constexpr int64_t kBlockRows = 32;  // query rows per GEMM block

template <typename T>
Vectorized<T> load(const T* p, int64_t n) {
  return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
}

template <typename T>
KeyRange window_of(const AdditiveInputs<T>& a, int64_t i) {
  return allowed_keys(i, a.kv_len, false, a.window_left, a.window_right);
}

template <typename T>
bool key_allowed(const AdditiveInputs<T>& a, int64_t b, int64_t i, int64_t j) {
  return a.mask == nullptr ||
         a.mask[b * a.mask_stride_batch + i * a.mask_stride_query + j * a.mask_stride_key];
}

// The keys of [first, first + count) that row i of batch b may attend to, as a list.
template <typename T>
void allowed_list(const AdditiveInputs<T>& a, int64_t b, int64_t i, KeyRange r, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t j = r.first; j <= r.last; ++j)
    if (key_allowed(a, b, i, j)) out.push_back(j);
}

// scores[n] = v . tanh(q + k_{keys[n]}) for the listed keys, four keys per pass over q and v.
template <typename T>
void score_keys(const T* q, const T* k_batch, const T* v, int64_t hidden, const int64_t* keys, int64_t count,
                T* scores) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto add = [](const Vec& x, const Vec& y) { return x + y; };
  int64_t n = 0;
  for (; n + 4 <= count; n += 4) {
    const T* k0 = k_batch + keys[n] * hidden;
    const T* k1 = k_batch + keys[n + 1] * hidden;
    const T* k2 = k_batch + keys[n + 2] * hidden;
    const T* k3 = k_batch + keys[n + 3] * hidden;
    Vec s0(0), s1(0), s2(0), s3(0);
    for (int64_t h = 0; h < hidden; h += W) {
      const int64_t w = std::min(W, hidden - h);
      const Vec qh = load(q + h, w), vh = load(v + h, w);
      s0 = at::vec::fmadd(vh, additive_unit(qh, load(k0 + h, w)), s0);
      s1 = at::vec::fmadd(vh, additive_unit(qh, load(k1 + h, w)), s1);
      s2 = at::vec::fmadd(vh, additive_unit(qh, load(k2 + h, w)), s2);
      s3 = at::vec::fmadd(vh, additive_unit(qh, load(k3 + h, w)), s3);
    }
    scores[n] = at::vec::vec_reduce_all<T>(add, s0);
    scores[n + 1] = at::vec::vec_reduce_all<T>(add, s1);
    scores[n + 2] = at::vec::vec_reduce_all<T>(add, s2);
    scores[n + 3] = at::vec::vec_reduce_all<T>(add, s3);
  }
  for (; n < count; ++n) {
    const T* k0 = k_batch + keys[n] * hidden;
    Vec s0(0);
    for (int64_t h = 0; h < hidden; h += W) {
      const int64_t w = std::min(W, hidden - h);
      s0 = at::vec::fmadd(load(v + h, w), additive_unit(load(q + h, w), load(k0 + h, w)), s0);
    }
    scores[n] = at::vec::vec_reduce_all<T>(add, s0);
  }
}

// For the listed keys with score gradients ds: dq += sum_n u_n, dk_{keys[n]} += u_n, dv += sum_n ds_n t_n,
// with t_n = tanh(q + k) and u_n = ds_n (1 - t_n^2) (the factor v is applied by the caller).
template <typename T>
void score_keys_backward(const T* q, const T* k_batch, int64_t hidden, const int64_t* keys, const T* ds,
                         int64_t count, T* dq, T* dk_batch, T* dv) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t n = 0;
  const auto step = [&](int64_t h, int64_t w, const Vec& qh, Vec& dqh, Vec& dvh, int64_t m) {
    const T* k = k_batch + keys[m] * hidden + h;
    T* dk = dk_batch + keys[m] * hidden + h;
    const Vec g(ds[m]);
    const Vec t = additive_unit(qh, load(k, w));
    dvh = at::vec::fmadd(g, t, dvh);
    const Vec u = additive_unit_grad(g, t);
    dqh = dqh + u;
    (load(dk, w) + u).store(dk, w);
  };
  for (; n + 4 <= count; n += 4)
    for (int64_t h = 0; h < hidden; h += W) {
      const int64_t w = std::min(W, hidden - h);
      const Vec qh = load(q + h, w);
      Vec dqh = load(dq + h, w), dvh = load(dv + h, w);
      for (int64_t m = n; m < n + 4; ++m) step(h, w, qh, dqh, dvh, m);
      dqh.store(dq + h, w);
      dvh.store(dv + h, w);
    }
  for (; n < count; ++n)
    for (int64_t h = 0; h < hidden; h += W) {
      const int64_t w = std::min(W, hidden - h);
      const Vec qh = load(q + h, w);
      Vec dqh = load(dq + h, w), dvh = load(dv + h, w);
      step(h, w, qh, dqh, dvh, n);
      dqh.store(dq + h, w);
      dvh.store(dv + h, w);
    }
}

template <typename T>
void softmax_listed(const T* scores, const int64_t* keys, int64_t count, T* weight_row) {
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < count; ++n) top = std::max(top, scores[n]);
  T sum = 0;
  for (int64_t n = 0; n < count; ++n) {
    const T e = std::exp(scores[n] - top);
    weight_row[keys[n]] = e;
    sum += e;
  }
  const T inv = T(1) / sum;
  for (int64_t n = 0; n < count; ++n) weight_row[keys[n]] *= inv;
}

// The span of keys any row of [i0, i1) may see: windows move right with the row.
template <typename T>
KeyRange block_span(const AdditiveInputs<T>& a, int64_t i0, int64_t i1) {
  return {window_of(a, i0).first, window_of(a, i1 - 1).last};
}

template <typename T>
void forward_block(const AdditiveForwardArgs<T>& a, int64_t b, int64_t i0, int64_t i1, std::vector<int64_t>& keys,
                   std::vector<T>& scores) {
  const int64_t Tq = a.q_len, Tk = a.kv_len, H = a.hidden, Dv = a.v_dim;
  const T* k_batch = a.k + b * Tk * H;
  for (int64_t i = i0; i < i1; ++i) {
    T* w_row = a.weights + (b * Tq + i) * Tk;
    std::fill(w_row, w_row + Tk, T(0));
    allowed_list(a, b, i, window_of(a, i), keys);
    const int64_t count = static_cast<int64_t>(keys.size());
    if (count == 0) continue;
    scores.resize(count);
    score_keys(a.q + (b * Tq + i) * H, k_batch, a.score, H, keys.data(), count, scores.data());
    softmax_listed(scores.data(), keys.data(), count, w_row);
  }
  T* ctx = a.context + (b * Tq + i0) * Dv;
  const KeyRange span = block_span(a, i0, i1);
  if (span.last < span.first) {
    std::fill(ctx, ctx + (i1 - i0) * Dv, T(0));
    return;
  }
  gemm(i1 - i0, Dv, span.last - span.first + 1, a.weights + (b * Tq + i0) * Tk + span.first, Tk,
       a.value + (b * Tk + span.first) * Dv, Dv, ctx, Dv, false);
}

// Rows [i0, i1) of batch b; dk and dV go to dk_batch and dvalue_batch (zeroed), dv to dv_acc.
template <typename T>
void backward_block(const AdditiveBackwardArgs<T>& a, int64_t b, int64_t i0, int64_t i1, T* dk_batch,
                    T* dvalue_batch, T* dv_acc, std::vector<T>& buffer, std::vector<int64_t>& keys,
                    std::vector<T>& ds) {
  const int64_t Tq = a.q_len, Tk = a.kv_len, H = a.hidden, Dv = a.v_dim, rows = i1 - i0;
  T* dq_block = a.grad_q + (b * Tq + i0) * H;
  std::fill(dq_block, dq_block + rows * H, T(0));
  const KeyRange span = block_span(a, i0, i1);
  const int64_t n = span.last - span.first + 1;
  if (n <= 0) return;
  buffer.resize(std::max(Dv, rows) * n + rows * n);
  T* transposed = buffer.data();        // V^T [Dv, n], then W^T [n, rows]
  T* dw = buffer.data() + std::max(Dv, rows) * n;  // [rows, n]
  const T* w_block = a.weights + (b * Tq + i0) * Tk + span.first;
  const T* dc_block = a.grad_context + (b * Tq + i0) * Dv;
  fast_transpose(n, Dv, a.value + (b * Tk + span.first) * Dv, Dv, transposed, n);
  gemm(rows, n, Dv, dc_block, Dv, transposed, n, dw, n, false);
  fast_transpose(rows, n, w_block, Tk, transposed, rows);
  gemm(n, Dv, rows, transposed, rows, dc_block, Dv, dvalue_batch + span.first * Dv, Dv, true);
  const T* k_batch = a.k + b * Tk * H;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const T* w_row = w_block + r * Tk;  // entry j - span.first for key j
    T* dw_row = dw + r * n;
    if (a.grad_weights != nullptr) {
      const T* gw_row = a.grad_weights + (b * Tq + i) * Tk;
      for (int64_t j = span.first; j <= span.last; ++j) dw_row[j - span.first] += gw_row[j];
    }
    allowed_list(a, b, i, window_of(a, i), keys);
    const int64_t count = static_cast<int64_t>(keys.size());
    T dot = 0;
    const int64_t f = span.first;
    for (int64_t m = 0; m < count; ++m) dot += w_row[keys[m] - f] * dw_row[keys[m] - f];
    ds.resize(count);
    int64_t live = 0;  // keys with a zero weight (exp underflow) add nothing: skip their tanh pass
    for (int64_t m = 0; m < count; ++m) {
      const T g = w_row[keys[m] - f] * (dw_row[keys[m] - f] - dot);
      if (g != T(0)) {
        keys[live] = keys[m];
        ds[live++] = g;
      }
    }
    T* dq = dq_block + r * H;
    score_keys_backward(a.q + (b * Tq + i) * H, k_batch, H, keys.data(), ds.data(), live, dq, dk_batch, dv_acc);
    for (int64_t h = 0; h < H; ++h) dq[h] *= a.score[h];
  }
}

template <typename T>
void forward(const AdditiveForwardArgs<T>& a) {
  const int64_t blocks = (a.q_len + kBlockRows - 1) / kBlockRows;
  parallel_for(a.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys;
    std::vector<T> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, i0 = (item % blocks) * kBlockRows;
      forward_block(a, b, i0, std::min(a.q_len, i0 + kBlockRows), keys, scores);
    }
  });
}

template <typename T>
void backward(const AdditiveBackwardArgs<T>& a) {
  const int64_t B = a.batch, Tq = a.q_len, Tk = a.kv_len, H = a.hidden, Dv = a.v_dim;
  if (B == 0) {
    std::fill(a.grad_score, a.grad_score + H, T(0));
    return;
  }
  // Chunks per batch: enough work items to share among the threads, but no more (each extra chunk costs a
  // private dk and dV and their sum).
  const int64_t want = 4 * num_threads();
  const int64_t chunks = B >= want ? 1 : std::max<int64_t>(1, std::min((want + B - 1) / B, Tq / 8));
  const int64_t items = B * chunks;
  std::vector<T> dv_partial(items * H, T(0));
  std::vector<T> dk_partial, dvalue_partial;
  if (chunks > 1) {
    dk_partial.assign(items * Tk * H, T(0));
    dvalue_partial.assign(items * Tk * Dv, T(0));
  }
  parallel_for(items, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer, ds;
    std::vector<int64_t> keys;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      int64_t r0, r1;
      split_range(Tq, chunks, item % chunks, r0, r1);
      T* dk = chunks > 1 ? dk_partial.data() + item * Tk * H : a.grad_k + b * Tk * H;
      T* dvalue = chunks > 1 ? dvalue_partial.data() + item * Tk * Dv : a.grad_value + b * Tk * Dv;
      for (int64_t i0 = r0; i0 < r1; i0 += kBlockRows)
        backward_block(a, b, i0, std::min(r1, i0 + kBlockRows), dk, dvalue, dv_partial.data() + item * H, buffer,
                       keys, ds);
    }
  });
  // Sum the chunks, then apply the factor v that the tanh pass left out of dk.
  parallel_for(B * Tk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Tk, j = row % Tk;
      T* dk = a.grad_k + row * H;
      T* dvalue = a.grad_value + row * Dv;
      for (int64_t c = 0; c < chunks && chunks > 1; ++c) {
        const int64_t item = b * chunks + c;
        const T* pk = dk_partial.data() + (item * Tk + j) * H;
        const T* pv = dvalue_partial.data() + (item * Tk + j) * Dv;
        for (int64_t h = 0; h < H; ++h) dk[h] += pk[h];
        for (int64_t d = 0; d < Dv; ++d) dvalue[d] += pv[d];
      }
      for (int64_t h = 0; h < H; ++h) dk[h] *= a.score[h];
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    T sum = 0;
    for (int64_t item = 0; item < items; ++item) sum += dv_partial[item * H + h];
    a.grad_score[h] = sum;
  }
}

}  // namespace

void additive_attention_forward(const AdditiveForwardArgs<float>& args) { forward(args); }
void additive_attention_forward(const AdditiveForwardArgs<double>& args) { forward(args); }
void additive_attention_backward(const AdditiveBackwardArgs<float>& args) { backward(args); }
void additive_attention_backward(const AdditiveBackwardArgs<double>& args) { backward(args); }

}  // namespace fl::FL_ISA
