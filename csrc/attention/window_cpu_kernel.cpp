// CPU kernels of windowed attention (see window_kernel.h). Built once per ISA.
//
// Forward: one work item is one query; its window's rows are consecutive, so scores and context are short dot
// products and row updates over a block that stays in L1. Backward: one work item is one batch, because the
// windows of its queries overlap and all add into the same source rows' gradients.
#include "attention/window_kernel.h"

#include "common/parallel.h"
#include "common/vec_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fl::FL_ISA {

namespace {

using at::vec::Vectorized;

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc(0);
  int64_t h = 0;
  for (; h + W <= n; h += W) acc = at::vec::fmadd(Vec::loadu(a + h), Vec::loadu(b + h), acc);
  T sum = at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return x + y; }, acc);
  for (; h < n; ++h) sum += a[h] * b[h];
  return sum;
}

// y += alpha * x
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec a(alpha);
  int64_t h = 0;
  for (; h + W <= n; h += W) at::vec::fmadd(a, Vec::loadu(x + h), Vec::loadu(y + h)).store(y + h);
  for (; h < n; ++h) y[h] += alpha * x[h];
}

template <typename T>
void forward(const WindowForwardArgs<T>& a) {
  const int64_t H = a.hidden, W = a.width;
  parallel_for(a.batch * a.q_len, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.q_len;
      const T* q = a.query + row * H;
      // Window position w is source row first + w; formed only where valid (then inside the source).
      const auto source_row = [&](int64_t w) { return a.source + (b * a.src_len + a.first[row] + w) * H; };
      const bool* valid = a.valid + row * W;
      T* probs = a.probs + row * W;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t w = 0; w < W; ++w) {
        probs[w] = valid[w] ? dot(q, source_row(w), H) : T(0);
        if (valid[w]) top = std::max(top, probs[w]);
      }
      T sum = 0;
      for (int64_t w = 0; w < W; ++w) {
        probs[w] = valid[w] ? std::exp(probs[w] - top) : T(0);
        sum += probs[w];
      }
      T* ctx = a.context + row * H;
      std::fill(ctx, ctx + H, T(0));
      if (sum == T(0)) continue;  // no valid position: zero probabilities and context
      const T inv = T(1) / sum;
      const T* factor = a.factor + row * W;
      for (int64_t w = 0; w < W; ++w) {
        probs[w] *= inv;
        if (valid[w]) axpy(probs[w] * factor[w], source_row(w), ctx, H);
      }
    }
  });
}

template <typename T>
void backward(const WindowBackwardArgs<T>& a) {
  const int64_t H = a.hidden, W = a.width;
  parallel_for(a.batch, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<T> dscore(W);
    for (int64_t b = b_begin; b < b_end; ++b)
      for (int64_t t = 0; t < a.q_len; ++t) {
        const int64_t row = b * a.q_len + t;
        const T* q = a.query + row * H;
        const T* dc = a.grad_context + row * H;
        const auto offset = [&](int64_t w) { return (b * a.src_len + a.first[row] + w) * H; };  // valid w only
        const bool* valid = a.valid + row * W;
        const T* probs = a.probs + row * W;
        const T* factor = a.factor + row * W;
        T* dfactor = a.grad_factor + row * W;
        T* dq = a.grad_query + row * H;
        std::fill(dq, dq + H, T(0));
        // weight = probs * factor: dweight = dc . row; dfactor = dweight * probs; dprobs = dweight * factor.
        T mean = 0;
        for (int64_t w = 0; w < W; ++w) {
          if (!valid[w]) {
            dfactor[w] = dscore[w] = T(0);
            continue;
          }
          const T dweight = dot(dc, a.source + offset(w), H);
          dfactor[w] = dweight * probs[w];
          dscore[w] = dweight * factor[w];  // dprobs for now
          mean += probs[w] * dscore[w];
        }
        for (int64_t w = 0; w < W; ++w) {
          if (!valid[w]) continue;
          const T ds = probs[w] * (dscore[w] - mean);
          axpy(ds, a.source + offset(w), dq, H);
          axpy(ds, q, a.grad_source + offset(w), H);
          axpy(probs[w] * factor[w], dc, a.grad_source + offset(w), H);
        }
      }
  });
}

}  // namespace

void window_attention_forward(const WindowForwardArgs<float>& args) { forward(args); }
void window_attention_forward(const WindowForwardArgs<double>& args) { forward(args); }
void window_attention_backward(const WindowBackwardArgs<float>& args) { backward(args); }
void window_attention_backward(const WindowBackwardArgs<double>& args) { backward(args); }

}  // namespace fl::FL_ISA
