// CPU kernels of fused scaled-dot-product attention (see sdpa_kernel.h). Built once per ISA.
//
// Forward: one work item is one tile of queries of one head. It walks the key tiles its rows may attend to
// (causal and banded masks skip the rest), computes the score tile with the GEMM engine, and folds it into
// running row maxima, sums and outputs (the online softmax); the score matrix is never stored. The row
// log-sum-exp is kept for the backward pass.
//
// Backward: one work item is one tile of keys (of one key/value head, for every query head that reads it). It
// recomputes the probabilities tile by tile from the saved log-sum-exp and accumulates dK and dV for its keys;
// dQ is accumulated into the output directly when a thread owns whole heads, or into per-thread buffers summed
// at the end when there are fewer heads than threads (so both cores work even for one head).
#include "attention/sdpa_kernel.h"

#include "attention/attention_math.h"
#include "common/gemm.h"
#include "common/transpose_kernel.h"
#include "common/parallel.h"
#include "common/strip_gemm.h"
#include "common/vec_math.h"
#include "common/workspace.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace fl::FL_ISA {

namespace {

using at::vec::Vectorized;

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 128;
// How far a key tile's scores may exceed a row's shift and still be exponentiated relative to it: the sum and
// the weighted values stay below exp(32) * S * max|v| (8e13 per key), far from float overflow, with full relative
// precision. Wide, so that a first tile's shift, taken from its first vector of scores, rarely needs a redo.
constexpr float kShiftSlack = 32;
// Up to this many queries per head the forward takes the decoding path (GEMV-like, memory bound).
constexpr int64_t kDecodeMaxQueries = 8;
// Keys and values of the next head are prefetched up to this size (a quarter of L2).
constexpr int64_t kPrefetchMaxBytes = int64_t(256) << 10;
// Cache lines asked for per row of softmax: enough to ask for a short head's next tile, keys and values (1280
// lines at L = S = 128, head size 64) within one tile's rows.
constexpr int64_t kPrefetchLinesPerRow = 24;
constexpr int64_t kDecodeBlock = 64;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

struct HeadIndex {
  int64_t batch, q_head, kv_head;
};

inline HeadIndex head_of(int64_t bh, const SdpaSizes& s) {
  const int64_t b = bh / s.q_heads, h = bh % s.q_heads;
  return {b, h, h / (s.q_heads / s.kv_heads)};
}

// Lines of up to four blocks of rows asked into L2 ahead of their use, a few at a time between pieces of work:
// the hardware prefetcher does not run ahead across a tile's rows, so a tile read from memory at its first use
// stalled on every line, and a thousand prefetches at once stalled on the few misses a core can have in flight.
class PrefetchQueue {
 public:
  // rows of row_bytes, stride bytes apart, from base; for_write: lines the core will write (in cache before the
  // stores reach them; a write hint where the build allows prefetchw, a read prefetch otherwise).
  void add(const void* base, int64_t rows, int64_t stride, int64_t row_bytes, bool for_write = false) {
    if (count_ < kBlocks && rows > 0 && row_bytes > 0)
      blocks_[count_++] = {static_cast<const char*>(base), rows, stride, (row_bytes + 63) / 64, for_write};
  }
  void issue(int64_t lines) {
    for (; lines > 0 && block_ < count_; --lines) {
      const Block& b = blocks_[block_];
      if (b.for_write)
        __builtin_prefetch(b.base + row_ * b.stride + line_ * 64, 1, 2);
      else
        __builtin_prefetch(b.base + row_ * b.stride + line_ * 64, 0, 2);
      if (++line_ == b.lines) line_ = 0, ++row_;
      if (row_ == b.rows) row_ = 0, ++block_;
    }
  }
  void clear() { count_ = block_ = row_ = line_ = 0; }

 private:
  static constexpr int kBlocks = 4;
  struct Block {
    const char* base;
    int64_t rows, stride, lines;
    bool for_write;
  };
  Block blocks_[kBlocks];
  int count_ = 0, block_ = 0;
  int64_t row_ = 0, line_ = 0;
};

// Range of queries that may attend to some key in [j0, j1), from the structural masks.
inline void queries_seeing(int64_t j0, int64_t j1, const SdpaSizes& s, const SdpaMasking& m, int64_t& i_lo,
                           int64_t& i_hi) {
  i_lo = 0;
  i_hi = s.q_len - 1;
  if (m.causal) i_lo = std::max(i_lo, j0);                        // key j is seen by queries i >= j
  if (m.window_right >= 0) i_lo = std::max(i_lo, j0 - m.window_right);  // j <= i + right
  if (m.window_left >= 0) i_hi = std::min(i_hi, j1 - 1 + m.window_left);  // j >= i - left
}

// Scales a score tile and applies every mask: scores[r, c] is query i0 + r against key j0 + c.
// scale == 1 skips the multiplication (the forward folds the scale into its copy of the queries).
template <typename T>
void finish_scores(T* scores, int64_t ld, int64_t rows, int64_t cols, int64_t i0, int64_t j0, int64_t b,
                   int64_t h, const SdpaSizes& s, const SdpaMasking& m, T scale) {
  using V = Vectorized<T>;
  const T* float_mask = static_cast<const T*>(m.float_mask);
  if (scale == T(1) && float_mask == nullptr && m.bool_mask == nullptr && !m.causal && m.window_left < 0 &&
      m.window_right < 0)
    return;  // nothing to do (the loop's per-row bookkeeping cost a percent of a bf16 forward)
  const Strides4& ms = m.mask_strides;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = scores + r * ld;
    const int64_t i = i0 + r;
    int64_t c = 0;
    if (scale != T(1)) {
      for (; c + V::size() <= cols; c += V::size()) (V::loadu(row + c) * V(scale)).store(row + c);
      for (; c < cols; ++c) row[c] *= scale;
    }
    if (float_mask != nullptr) {
      const T* mrow = float_mask + b * ms.batch + h * ms.head + i * ms.row + j0 * ms.col;
      if (ms.col == 1) {
        for (c = 0; c + V::size() <= cols; c += V::size())
          (V::loadu(row + c) + V::loadu(mrow + c)).store(row + c);
        for (; c < cols; ++c) row[c] += mrow[c];
      } else {
        for (c = 0; c < cols; ++c) row[c] += mrow[c * ms.col];
      }
    }
    if (m.bool_mask != nullptr) {
      const bool* mrow = m.bool_mask + b * ms.batch + h * ms.head + i * ms.row + j0 * ms.col;
      for (c = 0; c < cols; ++c)
        if (!mrow[c * ms.col]) row[c] = neg_inf<T>();
    }
    const KeyRange keys = allowed_keys(i, s.kv_len, m.causal, m.window_left, m.window_right);
    const int64_t keep_from = std::clamp<int64_t>(keys.first - j0, 0, cols);
    const int64_t keep_to = std::clamp<int64_t>(keys.last + 1 - j0, keep_from, cols);
    std::fill(row, row + keep_from, neg_inf<T>());
    std::fill(row + keep_to, row + cols, neg_inf<T>());
  }
}

// dst[c * rows + r] = src[r * ld + c]: a small tile transposed for use as a GEMM operand.
template <typename T>
void transpose_tile(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  fast_transpose(rows, cols, src, ld, dst, ld_dst);
}

template <typename T>
T row_max(const T* row, int64_t n) {
  using V = Vectorized<T>;
  T best = neg_inf<T>();
  int64_t c = 0;
  if (n >= V::size()) {
    V acc = V::loadu(row);
    for (c = V::size(); c + V::size() <= n; c += V::size()) acc = at::vec::maximum(acc, V::loadu(row + c));
    best = at::vec::vec_reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, acc);
  }
  for (; c < n; ++c) best = std::max(best, row[c]);
  return best;
}

// row[c] = exp(row[c] - shift), returning the sum. shift must be finite.
template <typename T>
T exp_shifted(T* row, int64_t n, T shift) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = exp_(V::loadu(row + c) - V(shift));
    e.store(row + c);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
  for (; c < n; ++c) {
    row[c] = std::exp(row[c] - shift);
    sum += row[c];
  }
  return sum;
}

// row[c] = exp(row[c] - shift) in one pass that also finds the row's maximum before the shift (returned in
// row_max_out); returns the sum. The caller checks the maximum: shift must not be far below it.
template <typename T>
T exp_shifted_with_max(T* row, int64_t n, T shift, T& row_max_out) {
  using V = Vectorized<T>;
  V acc(T(0)), best(neg_inf<T>());
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V x = V::loadu(row + c);
    best = at::vec::maximum(best, x);
    const V e = exp_(x - V(shift));
    e.store(row + c);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
  T top = at::vec::vec_reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, best);
  for (; c < n; ++c) {
    top = std::max(top, row[c]);
    row[c] = std::exp(row[c] - shift);
    sum += row[c];
  }
  row_max_out = top;
  return sum;
}

// The first whole vectors of a float row through dropout_keep, a vector of lanes at a time (element i has the
// index whose low half is lo + i, its high half hashed into `stream`); returns how many elements it did. The
// same bits as mix32: integer lanes wrap as uint32_t does, and a logical shift is the arithmetic one with the
// copies of the sign bit masked off.
int64_t dropout_row_lanes(float* row, int64_t n, uint32_t lo, uint32_t stream, float keep_scale, uint32_t threshold) {
  using VI = Vectorized<int32_t>;
  using VF = Vectorized<float>;
  static_assert(VI::size() == VF::size());
  const auto shift_right = [](const VI& x, int bits) {
    return (x >> VI(bits)) & VI(static_cast<int32_t>(0xffffffffu >> bits));
  };
  int32_t offsets[VI::size()];
  for (int64_t k = 0; k < VI::size(); ++k) offsets[k] = static_cast<int32_t>(k);
  const VI lane = VI::loadu(offsets);
  int64_t c = 0;
  for (; c + VI::size() <= n; c += VI::size()) {
    VI x = (VI(static_cast<int32_t>(lo + uint32_t(c))) + lane) ^ VI(static_cast<int32_t>(stream));
    x = x ^ shift_right(x, 16);
    x = x * VI(static_cast<int32_t>(0x7feb352dU));
    x = x ^ shift_right(x, 15);
    x = x * VI(static_cast<int32_t>(0x846ca68bU));
    x = x ^ shift_right(x, 16);
    // x >> 8 < 2^24 and threshold <= 2^24: a signed comparison is exact. Dropped where threshold > x >> 8.
    const VI drop = VI(static_cast<int32_t>(threshold)) > shift_right(x, 8);
    const VF kept = VF::loadu(row + c) * VF(keep_scale);
    VF::blendv(kept, VF(0.f), at::vec::cast<float>(drop)).store(row + c);
  }
  return c;
}

// Multiplies probabilities by the dropout mask scaled by 1/(1-p): zero where dropped.
template <typename T>
void apply_dropout(T* row, int64_t n, const SdpaMasking& m, uint64_t first_index, T keep_scale,
                   uint32_t threshold) {
  int64_t c = 0;
  // float: dropout_keep's hash in 32-bit lanes (as scalar, one hash per element it cost a third of the time of a
  // forward with dropout). A row's indices share their high half unless the row crosses a multiple of 2^32; such
  // a row (rare) stays scalar.
  if constexpr (std::is_same_v<T, float>) {
    if ((first_index >> 32) == ((first_index + uint64_t(n)) >> 32)) {
      const uint32_t seed_lo = static_cast<uint32_t>(m.seed), seed_hi = static_cast<uint32_t>(m.seed >> 32);
      const uint32_t stream = mix32(seed_lo ^ mix32(static_cast<uint32_t>(first_index >> 32) ^ seed_hi));
      const uint32_t lo = static_cast<uint32_t>(first_index);
      c = dropout_row_lanes(row, n, lo, stream, keep_scale, threshold);
    }
  }
  for (; c < n; ++c)
    row[c] = dropout_keep(m.seed, first_index + c, threshold) ? row[c] * keep_scale : T(0);
}

uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::min(p, 1.0) * double(1u << 24));
}

// A vector of a key or value row in the compute type: bf16 rows widen to float as they are read.
template <typename T>
Vectorized<T> load_row(const T* p) {
  return Vectorized<T>::loadu(p);
}
inline Vectorized<float> load_row(const bf16* p) {
  Vectorized<float> v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}

template <typename T, typename R>
T dot(const T* x, const R* y, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) acc = at::vec::fmadd(V::loadu(x + c), load_row(y + c), acc);
  T sum = at::vec::vec_reduce_all<T>([](V& u, V& w) { return u + w; }, acc);
  for (; c < n; ++c) sum += x[c] * static_cast<T>(y[c]);
  return sum;
}

// out[c] = out[c] * keep + sum over j of weights[j] * rows[j][c], for `count` rows `stride` apart: the output
// stays in registers across the rows, in chunks of four vectors (a call per row, through memory, took a third of
// a decoding step; decoding from cache, S = 2048, went 0.130 -> 0.109 ms).
template <typename T, typename R>
void accumulate_rows(T* out, const R* rows, int64_t stride, const T* weights, int64_t count, int64_t n, T keep) {
  using V = Vectorized<T>;
  constexpr int64_t kStep = 4 * V::size();
  int64_t c = 0;
  // Four named accumulators: GCC kept an array of them on the stack.
  for (; c + kStep <= n; c += kStep) {
    V a0 = V::loadu(out + c) * V(keep), a1 = V::loadu(out + c + V::size()) * V(keep);
    V a2 = V::loadu(out + c + 2 * V::size()) * V(keep), a3 = V::loadu(out + c + 3 * V::size()) * V(keep);
    for (int64_t j = 0; j < count; ++j) {
      const V w(weights[j]);
      const R* r = rows + j * stride + c;
      a0 = at::vec::fmadd(w, load_row(r), a0);
      a1 = at::vec::fmadd(w, load_row(r + V::size()), a1);
      a2 = at::vec::fmadd(w, load_row(r + 2 * V::size()), a2);
      a3 = at::vec::fmadd(w, load_row(r + 3 * V::size()), a3);
    }
    a0.store(out + c);
    a1.store(out + c + V::size());
    a2.store(out + c + 2 * V::size());
    a3.store(out + c + 3 * V::size());
  }
  for (; c + V::size() <= n; c += V::size()) {
    V acc = V::loadu(out + c) * V(keep);
    for (int64_t j = 0; j < count; ++j) acc = at::vec::fmadd(V(weights[j]), load_row(rows + j * stride + c), acc);
    acc.store(out + c);
  }
  for (; c < n; ++c) {
    T acc = out[c] * keep;
    for (int64_t j = 0; j < count; ++j) acc += weights[j] * static_cast<T>(rows[j * stride + c]);
    out[c] = acc;
  }
}

// dst[c] = src[c] * factor (dst may be src). In vector lanes: GCC leaves this loop scalar (dst and src may
// overlap), and at one row of the output per row of scores it took a sixth of a bf16 forward.
template <typename T>
void scale_row(T* dst, const T* src, int64_t n, T factor) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(src + c) * V(factor)).store(dst + c);
  for (; c < n; ++c) dst[c] = src[c] * factor;
}

// out[r] = log(sums[r]) (out may be sums). float: in vector lanes, where a call to logf per query row took a
// percent of a forward over short sequences.
template <typename T>
void log_of_rows(const T* sums, int64_t n, T* out) {
  for (int64_t r = 0; r < n; ++r) out[r] = std::log(sums[r]);
}
inline void log_of_rows(const float* sums, int64_t n, float* out) {
  using V = Vectorized<float>;
  int64_t r = 0;
  for (; r + V::size() <= n; r += V::size()) log_(V::loadu(sums + r)).store(out + r);
  for (; r < n; ++r) out[r] = std::log(sums[r]);
}

// Whether a float forward reads bf16 inputs (SdpaForwardArgs::q16).
template <typename T>
bool bf16_inputs(const SdpaForwardArgs<T>& a) {
  if constexpr (std::is_same_v<T, float>)
    return a.reads_bf16;
  else
    return false;
}

// dst = bf16(src * factor) (round to nearest even): a row of probabilities for the bf16 P V product, or of the
// output. AVX-512 builds use vcvtne2ps2bf16, one instruction per 32 values where torch's convert emulates the
// rounding in about ten: the bf16 products run only where the CPU has AVX512-BF16 (gemm_bf16_native). It reads a
// denormal as zero, which changes a probability or an output below 1.2e-38 by less than that.
inline void to_bf16(const float* src, bf16* dst, int64_t n, float factor = 1.f) {
  int64_t c = 0;
#if defined(FL_HAVE_AVX512)
  const __m512 f = _mm512_set1_ps(factor);
  for (; c + 32 <= n; c += 32) {
    const __m512 low = _mm512_mul_ps(_mm512_loadu_ps(src + c), f);
    const __m512 high = _mm512_mul_ps(_mm512_loadu_ps(src + c + 16), f);
    _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(high, low));
  }
#endif
  float rest[32];
  for (; c < n; c += 32) {
    const int64_t count = std::min<int64_t>(32, n - c);
    for (int64_t i = 0; i < count; ++i) rest[i] = src[c + i] * factor;
    at::vec::convert(rest, dst + c, count);
  }
}

// Partial row sums of the one-pass row step below: a vector of lanes per row, reduced once per row at the end.
constexpr int64_t kSumLanes = 16;

#if defined(FL_HAVE_AVX512)
// Two vectors of exponentials to 32 outputs (n of them, at most 32, at out): bf16 (rounded to nearest even,
// vcvtne2ps2bf16) or float.
inline void store_pair(bf16* out, __m512 e0, __m512 e1, int64_t n) {
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
  if (n == 32)
    _mm512_storeu_si512(out, packed);
  else
    _mm512_mask_storeu_epi16(out, __mmask32((1u << n) - 1), packed);
}
inline void store_pair(float* out, __m512 e0, __m512 e1, int64_t n) {
  if (n == 32) {
    _mm512_storeu_ps(out, e0);
    _mm512_storeu_ps(out + 16, e1);
    return;
  }
  _mm512_mask_storeu_ps(out, n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1), e0);
  if (n > 16) _mm512_mask_storeu_ps(out + 16, __mmask16((1u << (n - 16)) - 1), e1);
}
#endif

// The common row step of a float or bf16 forward, in one pass: out[c] = exp(row[c] * scale - shift) (out may be
// row; bf16 out: the probabilities for the bf16 P V product, with the scale folded in here instead of a pass of
// its own), the exponentials' sum added to sum_lanes, no horizontal reduction. Returns false, having changed
// nothing but out, when some scaled score exceeds the shift by more than kShiftSlack: the caller then redoes the
// tile the two-pass way. scale must be positive.
template <typename Out>
bool exp_in_lanes(const float* row, int64_t n, float scale, float shift, Out* out, float* sum_lanes) {
#if defined(FL_HAVE_AVX512)
  // bf16 probabilities are computed as 2^u, u = (x scale - shift) log2(e) in one FMA (exp2_for_bf16_...): the
  // bounds below are in the same units.
  constexpr bool base2 = std::is_same_v<Out, bf16>;
  const float unit = base2 ? 1.44269504089f : 1.f;
  const __m512 factor = _mm512_set1_ps(scale * unit), minus_shift = _mm512_set1_ps(-shift * unit);
  const __m512 lowest = _mm512_set1_ps(-104.f * unit), none = _mm512_set1_ps(neg_inf<float>());
  __m512 sum = _mm512_setzero_ps(), top = none;
  // No upper clamp: a lane past kShiftSlack sends the tile to the redo, whatever its exponential. The lower one
  // gives masked (-inf) scores 0; a NaN passes both (max returns its second operand) and reaches the sum.
  const auto exp_of = [&](__m512 x) {
    const __m512 t = _mm512_fmadd_ps(x, factor, minus_shift);
    top = _mm512_max_ps(top, t);
    const __m512 clamped = _mm512_max_ps(lowest, t);
    const __m512 e = base2 ? exp2_for_bf16_unclamped_avx512(clamped) : exp_unclamped_avx512(clamped);
    sum = _mm512_add_ps(sum, e);
    return e;
  };
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 e0 = exp_of(_mm512_loadu_ps(row + c)), e1 = exp_of(_mm512_loadu_ps(row + c + 16));
    store_pair(out + c, e0, e1, 32);
  }
  if (c < n) {  // the last 1..31 scores, as -inf past the end
    const int64_t rest = n - c;
    const __mmask16 low = rest >= 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
    const __mmask16 high = rest > 16 ? __mmask16((1u << (rest - 16)) - 1) : __mmask16(0);
    const __m512 e0 = exp_of(_mm512_mask_loadu_ps(none, low, row + c));
    const __m512 e1 = exp_of(_mm512_mask_loadu_ps(none, high, row + c + 16));
    store_pair(out + c, e0, e1, rest);
  }
  if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(kShiftSlack * unit), _CMP_GT_OQ) != 0) return false;
  _mm512_storeu_ps(sum_lanes, _mm512_add_ps(_mm512_loadu_ps(sum_lanes), sum));
  return true;
#else
  using V = Vectorized<float>;
  float e[kKeyTile], top = neg_inf<float>(), sum = 0;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V t = at::vec::fmadd(V::loadu(row + c), V(scale), V(-shift));
    top = std::max(top, at::vec::vec_reduce_all<float>([](V& x, V& y) { return at::vec::maximum(x, y); }, t));
    exp_(t).store(e + c);
  }
  for (; c < n; ++c) {
    const float t = row[c] * scale - shift;
    top = std::max(top, t);
    e[c] = std::exp(t);
  }
  if (top > kShiftSlack) return false;
  for (c = 0; c < n; ++c) sum += e[c];
  if constexpr (std::is_same_v<Out, float>)
    std::copy(e, e + n, out);
  else
    at::vec::convert(e, out, n);
  sum_lanes[0] += sum;
  return true;
#endif
}

// Few queries against many keys (decoding): memory bound, so no GEMM and no transposed copy of the keys;
// the keys are split among threads when there are fewer key/value heads than twice the threads, and the partial
// softmaxes merged.
template <typename T, typename In>
void decode_impl(const SdpaForwardArgs<T>& a, const In* q_in, const In* k_in, const In* v_in) {
  const SdpaSizes& s = a.sizes;
  const SdpaMasking& m = a.masking;
  const int64_t E = s.head_dim, Ev = s.v_dim, L = s.q_len, S = s.kv_len;
  const int64_t heads = s.batch * s.q_heads;
  if (heads == 0 || L == 0) return;
  // A work item is a key/value head (all the query heads of its group, all queries) and a split of its keys.
  const int64_t group = s.q_heads / s.kv_heads, kv_heads = s.batch * s.kv_heads, rows = group * L;
  const int threads = num_threads();
  const int64_t splits = kv_heads >= 2 * threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(
      (2 * threads + kv_heads - 1) / kv_heads, (S + kDecodeBlock - 1) / kDecodeBlock));
  const int64_t chunk = ((S + splits - 1) / splits + kDecodeBlock - 1) / kDecodeBlock * kDecodeBlock;
  const T scale = static_cast<T>(a.scale);
  const bool dropout = m.dropout_p > 0;
  const uint32_t threshold = dropout_threshold(m.dropout_p);
  const T keep_scale = m.dropout_p < 1 ? T(1) / T(1 - m.dropout_p) : T(0);
  // Partial results of every (head, split, query): running max, sum, and unnormalised output.
  std::vector<T> part_max(heads * splits * L, neg_inf<T>()), part_sum(heads * splits * L, T(0));
  std::vector<T> part_out(heads * splits * L * Ev, T(0));

  parallel_for(kv_heads * splits, 1, [&](int64_t begin, int64_t end) {
    // Per row (query head g of the group, query i; row g L + i): scaled query, key range, running max and sum.
    std::vector<T> q_scaled(rows * E), scores(kDecodeBlock), run_max(rows), run_sum(rows);
    std::vector<int64_t> first(rows), last(rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv_head = item / splits, split = item % splits;
      const int64_t batch = kv_head / s.kv_heads, kvh = kv_head % s.kv_heads;
      const In* k = k_in + batch * a.k_strides.batch + kvh * a.k_strides.head;
      const In* v = v_in + batch * a.v_strides.batch + kvh * a.v_strides.head;
      const int64_t bh0 = batch * s.q_heads + kvh * group;  // the group's first query head
      int64_t lo = S, hi = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / L, i = r % L;
        const In* q = q_in + batch * a.q_strides.batch + (kvh * group + g) * a.q_strides.head + i * a.q_strides.row;
        for (int64_t c = 0; c < E; ++c) q_scaled[r * E + c] = static_cast<T>(q[c]) * scale;
        const KeyRange keys = allowed_keys(i, S, m.causal, m.window_left, m.window_right);
        first[r] = std::max(split * chunk, keys.first);
        last[r] = std::min({(split + 1) * chunk, keys.last + 1, S});
        if (first[r] < last[r]) lo = std::min(lo, first[r]), hi = std::max(hi, last[r]);
        run_max[r] = neg_inf<T>();
        run_sum[r] = T(0);
      }
      // Rows inside the block loop: a block of keys and values (2 x 64 rows) is read from memory once and serves
      // every query of every head in the group from cache (row by row, K and V were read once per row).
      for (int64_t block = lo; block < hi; block += kDecodeBlock) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t j0 = std::max(block, first[r]), j1 = std::min(block + kDecodeBlock, last[r]);
          if (j1 <= j0) continue;
          const int64_t cols = j1 - j0, g = r / L, i = r % L, bh = bh0 + g;
          T* out = part_out.data() + ((bh * splits + split) * L + i) * Ev;
          for (int64_t c = 0; c < cols; ++c)
            scores[c] = dot(q_scaled.data() + r * E, k + (j0 + c) * a.k_strides.row, E);
          finish_scores(scores.data(), kDecodeBlock, 1, cols, i, j0, batch, kvh * group + g, s, m, T(1));
          const T new_max = std::max(run_max[r], row_max(scores.data(), cols));
          if (new_max == neg_inf<T>()) continue;
          const T correction = std::exp(run_max[r] - new_max);
          run_sum[r] = run_sum[r] * correction + exp_shifted(scores.data(), cols, new_max);
          run_max[r] = new_max;
          if (dropout)
            apply_dropout(scores.data(), cols, m, (uint64_t(bh) * L + i) * S + j0, keep_scale, threshold);
          accumulate_rows(out, v + j0 * a.v_strides.row, a.v_strides.row, scores.data(), cols, Ev, correction);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t slot = ((bh0 + r / L) * splits + split) * L + r % L;
        part_max[slot] = run_max[r];
        part_sum[slot] = run_sum[r];
      }
    }
  });

  parallel_for(heads * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t hr = begin; hr < end; ++hr) {
      const int64_t bh = hr / L, i = hr % L;
      T best = neg_inf<T>();
      for (int64_t split = 0; split < splits; ++split) best = std::max(best, part_max[(bh * splits + split) * L + i]);
      std::vector<T> row16(a.out16 != nullptr ? Ev : 0);  // the row before its rounding to bf16
      const HeadIndex hd = head_of(bh, s);
      const int64_t out_row = hd.batch * a.out_strides.batch + hd.q_head * a.out_strides.head + i * a.out_strides.row;
      T* out = a.out16 != nullptr ? row16.data() : a.out + out_row;
      std::fill(out, out + Ev, T(0));
      T total = 0;
      if (best != neg_inf<T>()) {
        for (int64_t split = 0; split < splits; ++split) {
          const int64_t slot = (bh * splits + split) * L + i;
          if (part_max[slot] == neg_inf<T>()) continue;
          const T w = std::exp(part_max[slot] - best);
          total += part_sum[slot] * w;
          accumulate_rows(out, part_out.data() + slot * Ev, Ev, &w, 1, Ev, T(1));
        }
      }
      const T inv = total > T(0) ? T(1) / total : T(0);
      for (int64_t c = 0; c < Ev; ++c) out[c] *= inv;
      if (a.out16 != nullptr) at::vec::convert(out, a.out16 + out_row, Ev);
      a.lse[2 * hr] = total > T(0) ? best : neg_inf<T>();
      a.lse[2 * hr + 1] = total > T(0) ? std::log(total) : T(0);
    }
  });
}

// On AVX2-only builds (common/strip_gemm.h) the forward's two products run the 6 x 16 strip tile on keys and
// values packed once per head, where oneDNN's AVX2 micro-kernel on 64 x 128 x 128 tiles fell behind torch's
// blocking at head size 128. Not on AVX-512: on a Xeon, oneDNN's tiles were 6-8% faster than the 12 x 32 strip
// tile in an A/B (forward and MultiheadAttention alike). Keys: strips of 16 keys, each E rows of 16 (zero past the last key), so a key
// tile's strips are contiguous and Q K^T is strip_gemm with K = E. Values: per key tile, strips of 16 value
// columns with the tile's rows, the layout strip_gemm reads for P V with K = the tile's keys.
bool forward_strips(const SdpaSizes& s) {
  return kStripPanels && !kAvx512Strips && s.head_dim <= kStripChunk && s.v_dim % kStripColumns == 0;
}

void pack_key_strips(int64_t S, int64_t E, const float* k, int64_t row, float* out) {
  for (int64_t j0 = 0; j0 < S; j0 += kStripColumns) {
    float* strip = out + j0 * E;
    for (int64_t c = 0; c < kStripColumns; ++c) {
      const float* key = k + (j0 + c) * row;
      for (int64_t e = 0; e < E; ++e) strip[e * kStripColumns + c] = j0 + c < S ? key[e] : 0.0f;
    }
  }
}

// The backward's: Q K^T and dO V^T over strips of keys (K = E, Ev), dS K over strips of E columns (E a multiple
// of 16), dV^T and dK^T over each query tile's P and dS packed as strips of keys. Only above head size 64: A/B
// on Zen 3, fwd+bwd (8, 8, 256, D): D = 128 62-78 ms against 76-81 on oneDNN's tiles, but D = 64 10-15% slower
// (packing P and dS per query tile costs twice as much per FLOP at half the head size).
bool backward_strips(const SdpaSizes& s) {
  return kStripPanels && !kAvx512Strips && s.head_dim > 64 && s.head_dim <= kStripChunk && s.v_dim <= kStripChunk &&
         s.head_dim % kStripColumns == 0;
}

// rows x cols of a tile (rows ld apart) as strips of 16 columns, zero from column cols to cols_padded.
void pack_tile_strips(int64_t rows, int64_t cols, int64_t cols_padded, const float* tile, int64_t ld, float* out) {
  for (int64_t c0 = 0; c0 < cols_padded; c0 += kStripColumns) {
    float* strip = out + c0 * rows;
    const int64_t n = std::clamp<int64_t>(cols - c0, 0, kStripColumns);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(strip + r * kStripColumns, tile + r * ld + c0, sizeof(float) * n);
      std::fill(strip + r * kStripColumns + n, strip + (r + 1) * kStripColumns, 0.0f);
    }
  }
}

void pack_value_strips(int64_t S, int64_t Ev, const float* v, int64_t row, float* out) {
  for (int64_t j0 = 0; j0 < S; j0 += kKeyTile) {
    const int64_t keys = std::min(kKeyTile, S - j0);
    float* tile = out + j0 * Ev;
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t c0 = 0; c0 < Ev; c0 += kStripColumns)
        std::memcpy(tile + c0 * keys + j * kStripColumns, v + (j0 + j) * row + c0, sizeof(float) * kStripColumns);
  }
}

// One bf16 key/value head for the bf16 GEMM: K^T [E x S] packed (pack_b_bf16's layout, pairs of rows of K^T
// interleaved; for even E that is K viewed as [S x E/2] pairs, transposed), and V packed per key tile.
void pack_head_bf16(int64_t S, int64_t E, int64_t Ev, const bf16* k, int64_t k_row, const bf16* v, int64_t v_row,
                    bf16* keys, bf16* values) {
  if (E % 2 == 0 && k_row % 2 == 0 && reinterpret_cast<uintptr_t>(k) % 4 == 0) {
    // Pairs moved as 32-bit words by the float transpose (moves only: no arithmetic touches the bits).
    fast_transpose(S, E / 2, reinterpret_cast<const float*>(k), k_row / 2, reinterpret_cast<float*>(keys), S);
  } else {
    std::vector<bf16> k_t(E * S);
    transpose_copy(S, E, k, k_row, k_t.data(), S);
    pack_b_bf16(E, S, k_t.data(), S, keys);
  }
  for (int64_t j0 = 0; j0 < S; j0 += kKeyTile)
    pack_b_bf16(std::min(kKeyTile, S - j0), Ev, v + j0 * v_row, v_row, values + j0 * Ev);
}

template <typename T>
void forward_impl(const SdpaForwardArgs<T>& a) {
  if (a.sizes.q_len <= kDecodeMaxQueries) {
    if constexpr (std::is_same_v<T, float>)
      if (bf16_inputs(a)) return decode_impl(a, a.q16, a.k16, a.v16);
    return decode_impl(a, a.q, a.k, a.v);
  }
  const SdpaSizes& s = a.sizes;
  const SdpaMasking& m = a.masking;
  const int64_t E = s.head_dim, Ev = s.v_dim, L = s.q_len, S = s.kv_len;
  const int64_t q_tiles = (L + kQueryTile - 1) / kQueryTile;
  const int64_t items = s.batch * s.q_heads * q_tiles;
  const T scale = static_cast<T>(a.scale);
  const bool dropout = m.dropout_p > 0;
  const uint32_t threshold = dropout_threshold(m.dropout_p);
  const T keep_scale = m.dropout_p < 1 ? T(1) / T(1 - m.dropout_p) : T(0);
  const int64_t flops_per_item = 4 * kQueryTile * std::max<int64_t>(S, 1) * std::max(E, Ev);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / flops_per_item);

  // Keys transposed once per head ([E x S], rows padded off 512-byte multiples), the right operand of Q K^T;
  // or, with strips, keys and values packed once per head.
  // With bf16 inputs: keys as the packed right operand of a [E x S] product and values packed per key tile,
  // once per head, for the bf16 GEMM.
  const bool packed16 = bf16_inputs(a);
  const bool strips = std::is_same_v<T, float> && !packed16 && forward_strips(s);
  const int64_t ld_kt = (S * int64_t(sizeof(T))) % 512 == 0 ? S + 64 / int64_t(sizeof(T)) : S;
  const int64_t S_padded = (S + kStripColumns - 1) / kStripColumns * kStripColumns;
  const int64_t kv_heads = s.batch * s.kv_heads;
  const int64_t key_floats = packed16 ? 0 : strips ? S_padded * E : E * ld_kt;
  // With many heads (and no strips), each thread takes whole heads and transposes a head's keys (bf16: packs its
  // keys and values) when its first item comes up, into buffers of the thread's own: the copies stay in cache for
  // the head's items instead of going to memory and back (a tenth of a forward at L = S = 128). With few heads,
  // threads share a head's items, and every head is prepared once, first.
  const int64_t threads = num_threads();
  const bool keys_per_thread = !strips && s.batch * s.q_heads >= 8 * threads;
  T* keys_t = keys_per_thread ? nullptr : workspace<T>(WorkspaceSlot::left, kv_heads * key_floats);
  T* value_strips = strips ? workspace<T>(WorkspaceSlot::product, kv_heads * S * Ev) : nullptr;
  const int64_t key_size16 = packed16 ? packed_b_bf16_size(E, S) : 0;
  const int64_t value_size16 = packed16 ? (S + kKeyTile - 1) / kKeyTile * kKeyTile * Ev : 0;
  const bool shared16 = packed16 && !keys_per_thread;
  bf16* keys16 = shared16 ? workspace<bf16>(WorkspaceSlot::gates, kv_heads * key_size16) : nullptr;
  bf16* values16 = shared16 ? workspace<bf16>(WorkspaceSlot::raw, kv_heads * value_size16) : nullptr;
  // One key/value head made ready for the products, into the given buffers: its keys transposed, or (strips)
  // keys and values packed as strips, or (bf16) keys and values packed for the bf16 GEMM.
  const auto prepare_head = [&](int64_t b, int64_t kvh, T* keys_out, T* value_strips_out, bf16* keys16_out,
                                bf16* values16_out) {
    if constexpr (std::is_same_v<T, float>)
      if (packed16)
        return pack_head_bf16(S, E, Ev, a.k16 + b * a.k_strides.batch + kvh * a.k_strides.head, a.k_strides.row,
                              a.v16 + b * a.v_strides.batch + kvh * a.v_strides.head, a.v_strides.row, keys16_out,
                              values16_out);
    const T* k = a.k + b * a.k_strides.batch + kvh * a.k_strides.head;
    if constexpr (std::is_same_v<T, float>)
      if (strips) {
        pack_key_strips(S, E, k, a.k_strides.row, keys_out);
        return pack_value_strips(S, Ev, a.v + b * a.v_strides.batch + kvh * a.v_strides.head, a.v_strides.row,
                                 value_strips_out);
      }
    fast_transpose(S, E, k, a.k_strides.row, keys_out, ld_kt);
  };
  parallel_for(keys_per_thread ? 0 : kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head)
      prepare_head(head / s.kv_heads, head % s.kv_heads, keys_t + head * key_floats,
                   strips ? value_strips + head * S * Ev : nullptr, keys16 + head * key_size16,
                   values16 + head * value_size16);
  });
  // The bf16 products take the scale on the float scores; the others on a scaled copy of the queries. Without
  // a float mask or dropout, a bf16 forward folds the scale into its exponentials (exp_in_lanes).
  const bool fold_scale = packed16 && m.float_mask == nullptr && !dropout && scale > T(0);
  const T score_scale = packed16 ? scale : T(1);
  const T tile_scale = fold_scale ? T(1) : score_scale;

  // Chunks of about a sixteenth of each thread's share, taken in turn (causal items differ in cost, and a busy
  // machine slows one thread more than another).
  int64_t chunk = std::max(grain, items / (16 * threads));
  if (keys_per_thread) chunk = (chunk + q_tiles - 1) / q_tiles * q_tiles;  // whole heads
  parallel_for_dynamic(items, chunk, [&](int64_t begin, int64_t end) {
    T* own_keys = keys_per_thread && !packed16 ? workspace<T>(WorkspaceSlot::left, key_floats) : nullptr;
    // Values whose rows are a multiple of 2 KiB apart (the packed projections of MultiheadAttention: 3 E floats)
    // are copied once per head into contiguous rows, where the GEMM would copy every tile of them again for each
    // query tile (rows that far apart share L1 sets).
    const bool copy_values = keys_per_thread && !packed16 && (a.v_strides.row * int64_t(sizeof(T))) % 2048 == 0;
    T* own_values = copy_values ? workspace<T>(WorkspaceSlot::product, S * Ev) : nullptr;
    bf16* own_keys16 = keys_per_thread && packed16 ? workspace<bf16>(WorkspaceSlot::gates, key_size16) : nullptr;
    bf16* own_values16 = keys_per_thread && packed16 ? workspace<bf16>(WorkspaceSlot::raw, value_size16) : nullptr;
    int64_t own_head = -1;
    std::vector<T> scores(kQueryTile * kKeyTile), acc(kQueryTile * Ev), q_scaled(packed16 ? 0 : kQueryTile * E);
    std::vector<T> row_max_v(kQueryTile), row_sum(kQueryTile);
    std::vector<bf16> probs16(packed16 ? kQueryTile * kKeyTile : 0);
    constexpr bool in_lanes = std::is_same_v<T, float>;  // float forwards take the one-pass row step in lanes
    std::vector<float> sum_lanes(in_lanes ? kQueryTile * kSumLanes : 0);
    // A row's sum of exponentials so far, its partial lanes included (and cleared).
    const auto take_lanes = [&](int64_t r) {
      if (!in_lanes) return;
      float* lanes = sum_lanes.data() + r * kSumLanes;
      for (int64_t k = 0; k < kSumLanes; ++k) row_sum[r] += std::exchange(lanes[k], 0.f);
    };
    PrefetchQueue prefetch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_tiles, i0 = (item % q_tiles) * kQueryTile;
      const int64_t rows = std::min(kQueryTile, L - i0);
      const HeadIndex hd = head_of(bh, s);
      const int64_t q_offset = hd.batch * a.q_strides.batch + hd.q_head * a.q_strides.head + i0 * a.q_strides.row;
      if (!packed16) {
        const T* q_in = a.q + q_offset;
        for (int64_t r = 0; r < rows; ++r) scale_row(q_scaled.data() + r * E, q_in + r * a.q_strides.row, E, scale);
      }
      const int64_t kv_head = hd.batch * s.kv_heads + hd.kv_head;
      prefetch.clear();
      if (item + 1 < end) {  // the next item's queries, output rows and, if it starts a head, keys and values
        const int64_t next_bh = (item + 1) / q_tiles, next_i0 = ((item + 1) % q_tiles) * kQueryTile;
        const HeadIndex next = head_of(next_bh, s);
        const int64_t bytes = packed16 ? 2 : int64_t(sizeof(T));
        const auto address = [&](const void* t16, const T* t, int64_t offset) {
          return packed16 ? static_cast<const void*>(static_cast<const bf16*>(t16) + offset)
                          : static_cast<const void*>(t + offset);
        };
        prefetch.add(address(a.q16, a.q, next.batch * a.q_strides.batch + next.q_head * a.q_strides.head +
                                             next_i0 * a.q_strides.row),
                     std::min(kQueryTile, L - next_i0), bytes * a.q_strides.row, bytes * E);
        const int64_t out_row = next.batch * a.out_strides.batch + next.q_head * a.out_strides.head +
                                next_i0 * a.out_strides.row;
        if (a.out16 != nullptr)
          prefetch.add(a.out16 + out_row, std::min(kQueryTile, L - next_i0), 2 * a.out_strides.row, 2 * Ev, true);
        else if (a.out != nullptr)
          prefetch.add(a.out + out_row, std::min(kQueryTile, L - next_i0), int64_t(sizeof(T)) * a.out_strides.row,
                       int64_t(sizeof(T)) * Ev, true);
        const bool next_head = next.batch * s.kv_heads + next.kv_head != kv_head;
        if (keys_per_thread && next_head && S * (E + Ev) * bytes <= kPrefetchMaxBytes) {
          prefetch.add(address(a.k16, a.k, next.batch * a.k_strides.batch + next.kv_head * a.k_strides.head), S,
                       bytes * a.k_strides.row, bytes * E);
          prefetch.add(address(a.v16, a.v, next.batch * a.v_strides.batch + next.kv_head * a.v_strides.head), S,
                       bytes * a.v_strides.row, bytes * Ev);
        }
      }
      if (keys_per_thread && own_head != kv_head) {
        own_head = kv_head;
        prepare_head(hd.batch, hd.kv_head, own_keys, nullptr, own_keys16, own_values16);
        if (copy_values) {
          const T* v_head = a.v + hd.batch * a.v_strides.batch + hd.kv_head * a.v_strides.head;
          for (int64_t j = 0; j < S; ++j)
            std::memcpy(own_values + j * Ev, v_head + j * a.v_strides.row, sizeof(T) * Ev);
        }
      }
      const T* k_t = keys_per_thread ? own_keys : keys_t + kv_head * key_floats;
      const bf16* head_keys16 = keys_per_thread ? own_keys16 : keys16 + kv_head * key_size16;
      const bf16* head_values16 = keys_per_thread ? own_values16 : values16 + kv_head * value_size16;
      // scores[n x cols] = the tile's queries [r0, r0 + n) times K^T for the keys [j0, j0 + cols); with strips,
      // up to the next strip of keys (zero keys past S: the extra columns are never read).
      const auto key_product = [&](int64_t r0, int64_t n, int64_t cols, int64_t j0, T* out) {
        if constexpr (std::is_same_v<T, float>) {
          if (packed16)
            return gemm_bf16(n, cols, E, a.q16 + q_offset + r0 * a.q_strides.row, a.q_strides.row,
                             head_keys16, S, j0, out, kKeyTile, false);
          if (strips)
            return strip_gemm(n, (cols + kStripColumns - 1) / kStripColumns * kStripColumns, E,
                              q_scaled.data() + r0 * E, E, k_t + j0 * E, out, kKeyTile, false);
        }
        gemm(n, cols, E, q_scaled.data() + r0 * E, E, k_t + j0, ld_kt, out, kKeyTile, false);
      };
      const T* v = copy_values ? own_values : a.v + hd.batch * a.v_strides.batch + hd.kv_head * a.v_strides.head;
      const int64_t v_row = copy_values ? Ev : a.v_strides.row;
      std::fill(acc.begin(), acc.begin() + rows * Ev, T(0));
      std::fill(row_max_v.begin(), row_max_v.end(), neg_inf<T>());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(sum_lanes.begin(), sum_lanes.end(), 0.f);

      // Key tiles that some row of this tile may attend to (the structural masks skip the others).
      int64_t j_begin = S, j_end = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const KeyRange keys = allowed_keys(i0 + r, S, m.causal, m.window_left, m.window_right);
        if (keys.last < keys.first) continue;
        j_begin = std::min(j_begin, keys.first);
        j_end = std::max(j_end, keys.last + 1);
      }
      for (int64_t j0 = (j_begin / kKeyTile) * kKeyTile; j0 < j_end; j0 += kKeyTile) {
        // The last tile stops at the last key any row may attend to, rounded up to 32 keys (whole vectors, and
        // whole pairs for the bf16 products): on a causal diagonal that halves the masked-out work.
        const int64_t cols = std::min({kKeyTile, S - j0, (j_end - j0 + 31) / 32 * 32});
        key_product(0, rows, cols, j0, scores.data());
        finish_scores(scores.data(), kKeyTile, rows, cols, i0, j0, hd.batch, hd.q_head, s, m, tile_scale);
        // The two-pass step of a row p of scaled scores: a new running maximum, the row's sum and output so far
        // rescaled to it, p exponentiated relative to it.
        const auto two_pass = [&](int64_t r, T* p) {
          const T new_max = std::max(row_max_v[r], row_max(p, cols));
          if (new_max == neg_inf<T>()) {  // nothing attended yet: the row stays empty
            std::fill(p, p + cols, T(0));
            return;
          }
          const T correction = std::exp(row_max_v[r] - new_max);  // 0 on the row's first live tile
          row_sum[r] = row_sum[r] * correction + exp_shifted(p, cols, new_max);
          row_max_v[r] = new_max;
          if (correction != T(1)) scale_row(acc.data() + r * Ev, acc.data() + r * Ev, Ev, correction);
          if (dropout)
            apply_dropout(p, cols, m, (uint64_t(bh) * L + i0 + r) * S + j0, keep_scale, threshold);
        };
        for (int64_t r = 0; r < rows; ++r) {
          prefetch.issue(kPrefetchLinesPerRow);
          T* p = scores.data() + r * kKeyTile;
          // Exponentials in one pass (no separate max pass, no rescaling), relative to the row's running maximum
          // or, on its first tile, to the maximum of the tile's first vector of scores. Softmax does not depend on
          // the shift; only overflow does, so a tile whose maximum exceeds the shift by more than kShiftSlack is
          // recomputed the two-pass way. The shift is at most the row's maximum, so the sum is at least 1.
          const int64_t first_lanes = std::min<int64_t>(Vectorized<T>::size(), cols);
          if constexpr (in_lanes) {
            // fold_scale: from unscaled scores straight to bf16 probabilities; otherwise in place.
            const float factor = fold_scale ? scale : 1.f;
            const float shift = row_max_v[r] != neg_inf<T>() ? row_max_v[r] : row_max(p, first_lanes) * factor;
            bf16* probs = probs16.data() + r * kKeyTile;
            float* lanes = sum_lanes.data() + r * kSumLanes;
            if (shift != neg_inf<T>()) {
              if (fold_scale ? exp_in_lanes(p, cols, factor, shift, probs, lanes)
                             : exp_in_lanes(p, cols, 1.f, shift, p, lanes)) {
                row_max_v[r] = shift;
                if (dropout)
                  apply_dropout(p, cols, m, (uint64_t(bh) * L + i0 + r) * S + j0, keep_scale, threshold);
                continue;
              }
              key_product(r, 1, cols, j0, p);
              finish_scores(p, kKeyTile, 1, cols, i0 + r, j0, hd.batch, hd.q_head, s, m, score_scale);
            } else if (fold_scale) {
              scale_row(p, p, cols, scale);
            }
            take_lanes(r);
            two_pass(r, p);
            if (fold_scale) to_bf16(p, probs, cols);
            continue;
          }
          const T shift = row_max_v[r] != neg_inf<T>() ? row_max_v[r] : row_max(p, first_lanes);
          if (shift != neg_inf<T>()) {
            T tile_max;
            const T sum = exp_shifted_with_max(p, cols, shift, tile_max);
            if (!(tile_max > shift + kShiftSlack)) {
              row_max_v[r] = shift;
              row_sum[r] += sum;
              if (dropout)
                apply_dropout(p, cols, m, (uint64_t(bh) * L + i0 + r) * S + j0, keep_scale, threshold);
              continue;
            }
            key_product(r, 1, cols, j0, p);
            finish_scores(p, kKeyTile, 1, cols, i0 + r, j0, hd.batch, hd.q_head, s, m, score_scale);
          }
          two_pass(r, p);
        }
        if constexpr (std::is_same_v<T, float>) {
          if (packed16) {
            for (int64_t r = 0; r < rows && !fold_scale; ++r)
              to_bf16(scores.data() + r * kKeyTile, probs16.data() + r * kKeyTile, cols);
            gemm_bf16(rows, Ev, cols, probs16.data(), kKeyTile, head_values16 + j0 * Ev, Ev, 0,
                      acc.data(), Ev, true);
            continue;
          }
          if (strips) {
            strip_gemm(rows, Ev, cols, scores.data(), kKeyTile, value_strips + kv_head * S * Ev + j0 * Ev,
                       acc.data(), Ev, true);
            continue;
          }
        }
        gemm(rows, Ev, cols, scores.data(), kKeyTile, v + j0 * v_row, v_row, acc.data(), Ev, true);
      }
      T* lse = a.lse + 2 * (bh * L + i0);
      for (int64_t r = 0; r < rows; ++r) {
        take_lanes(r);
        const bool empty = row_sum[r] == T(0);
        const T inv = empty ? T(0) : T(1) / row_sum[r];
        const int64_t out_row = hd.batch * a.out_strides.batch + hd.q_head * a.out_strides.head +
                                (i0 + r) * a.out_strides.row;
        if constexpr (std::is_same_v<T, float>)
          if (a.out16 != nullptr) to_bf16(acc.data() + r * Ev, a.out16 + out_row, Ev, inv);
        if (a.out != nullptr) scale_row(a.out + out_row, acc.data() + r * Ev, Ev, inv);
        lse[2 * r] = empty ? neg_inf<T>() : row_max_v[r];
      }
      log_of_rows(row_sum.data(), rows, row_sum.data());  // (an empty row's log is -inf: stored as 0)
      for (int64_t r = 0; r < rows; ++r) lse[2 * r + 1] = lse[2 * r] == neg_inf<T>() ? T(0) : row_sum[r];
    }
  });
}

template <typename T>
void backward_impl(const SdpaBackwardArgs<T>& a) {
  const SdpaSizes& s = a.sizes;
  const SdpaMasking& m = a.masking;
  const int64_t E = s.head_dim, Ev = s.v_dim, L = s.q_len, S = s.kv_len;
  if (s.kv_heads == 0) return;  // no heads: nothing to differentiate
  const int64_t group = s.q_heads / s.kv_heads;
  const bool strips = std::is_same_v<T, float> && backward_strips(s);
  const T scale = static_cast<T>(a.scale);
  const bool dropout = m.dropout_p > 0;
  const uint32_t threshold = dropout_threshold(m.dropout_p);
  const T keep_scale = m.dropout_p < 1 ? T(1) / T(1 - m.dropout_p) : T(0);

  const int64_t go_row = a.grad_out_strides.row;
  // D_i = sum_c dO[i, c] * O[i, c]: the softmax backward's row term.
  const int64_t total_rows = s.batch * s.q_heads * L;
  std::vector<T> row_dot(total_rows);
  const auto row_of = [&](const T* base, const Strides4& st, int64_t row) {  // row: (batch q_heads + head) L + i
    const int64_t bh = row / L, b = bh / s.q_heads, h = bh % s.q_heads;
    return base + b * st.batch + h * st.head + (row % L) * st.row;
  };
  parallel_for(total_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* go = row_of(a.grad_out, a.grad_out_strides, row);
      const T* o = row_of(a.out, a.out_strides, row);
      T acc = 0;
      for (int64_t c = 0; c < Ev; ++c) acc += go[c] * o[c];
      row_dot[row] = acc;
    }
  });

  const int64_t k_tiles = (S + kKeyTile - 1) / kKeyTile;
  const int64_t heads = s.batch * s.kv_heads;
  const int threads = num_threads();
  // With enough heads each thread owns whole heads and writes dQ directly; otherwise key tiles are shared out
  // and each group of items accumulates dQ in a buffer of its own.
  const bool split_keys = heads < 2 * threads && k_tiles > 1;
  std::vector<T> private_dq(split_keys ? size_t(threads) * total_rows * E : 0, T(0));
  if (!split_keys) std::fill(a.grad_q, a.grad_q + total_rows * E, T(0));
  const int64_t items = split_keys ? heads * k_tiles : heads;

  // Work is dealt out as `threads` groups of items, and each group owns one dQ buffer in split mode: the buffer
  // follows the group, not the thread id, so it stays private even if a nested call runs the groups inline.
  // Whole heads are taken one at a time in turn (see parallel_for_dynamic); the split groups, one per thread.
  const int64_t groups = split_keys ? threads : items;
  (split_keys ? parallel_for : parallel_for_dynamic)(groups, 1, [&](int64_t group_begin, int64_t group_end) {
    for (int64_t group_index = group_begin; group_index < group_end; ++group_index) {
      int64_t begin, end;
      if (split_keys) {
        split_range(items, groups, group_index, begin, end);
      } else {
        begin = group_index;
        end = group_index + 1;
      }
      // Per tile pair everything is a GEMM on untransposed tiles: dV^T += dO^T P and dK^T += Q^T dS use the
      // queries and output gradients transposed once per head (q_t, grad_out_t), not a transpose per tile.
      std::vector<T> key_t(E * kKeyTile), value_t(Ev * kKeyTile), probs(kQueryTile * kKeyTile),
          dprobs(kQueryTile * kKeyTile),
          dk_t(E * kKeyTile), dv_t(Ev * kKeyTile), q_scaled(L * E), q_t(E * L), grad_out_t(Ev * L);
      // With strips (backward_strips): the key tile as strips of keys (Q K^T) and of E columns (dS K), the value
      // tile as strips of keys (dO V^T), and each query tile's P and dS as strips (dV^T, dK^T).
      std::vector<float> key_strips(strips ? E * kKeyTile : 0), key_rows(strips ? E * kKeyTile : 0),
          value_strips(strips ? Ev * kKeyTile : 0), kept_strips(strips ? kQueryTile * kKeyTile : 0),
          ds_strips(strips ? kQueryTile * kKeyTile : 0);
      T* dq_base = split_keys ? private_dq.data() + size_t(group_index) * total_rows * E : a.grad_q;
      int64_t prepared_head = -1;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t head = split_keys ? item / k_tiles : item;
        const int64_t tile_begin = split_keys ? item % k_tiles : 0, tile_end = split_keys ? tile_begin + 1 : k_tiles;
        const int64_t b = head / s.kv_heads, kvh = head % s.kv_heads;
        const T* k = a.k + b * a.k_strides.batch + kvh * a.k_strides.head;
        const T* v = a.v + b * a.v_strides.batch + kvh * a.v_strides.head;
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          const int64_t j0 = tile * kKeyTile, cols = std::min(kKeyTile, S - j0);
          // Products with strips run over whole strips of keys: ld_d is dK^T's and dV^T's row length.
          const int64_t cols_padded = (cols + kStripColumns - 1) / kStripColumns * kStripColumns;
          const int64_t ld_d = strips ? cols_padded : cols;
          if constexpr (std::is_same_v<T, float>)
            if (strips) {
              pack_key_strips(cols, E, k + j0 * a.k_strides.row, a.k_strides.row, key_strips.data());
              pack_strips(cols, E, k + j0 * a.k_strides.row, a.k_strides.row, key_rows.data());
              pack_key_strips(cols, Ev, v + j0 * a.v_strides.row, a.v_strides.row, value_strips.data());
            }
          if (!strips) {
            transpose_tile(k + j0 * a.k_strides.row, a.k_strides.row, cols, E, key_t.data(), cols);
            transpose_tile(v + j0 * a.v_strides.row, a.v_strides.row, cols, Ev, value_t.data(), cols);
          }
          std::fill(dk_t.begin(), dk_t.end(), T(0));
          std::fill(dv_t.begin(), dv_t.end(), T(0));
          int64_t i_lo, i_hi;
          queries_seeing(j0, j0 + cols, s, m, i_lo, i_hi);
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
            const int64_t bh = b * s.q_heads + h;
            const T* q_head = a.q + b * a.q_strides.batch + h * a.q_strides.head;
            const T* grad_out_head = a.grad_out + b * a.grad_out_strides.batch + h * a.grad_out_strides.head;
            if (i_lo > i_hi) continue;
            if (prepared_head != bh) {  // this head's queries (scaled, and transposed) and dO transposed
              for (int64_t i = 0; i < L; ++i)
                for (int64_t c = 0; c < E; ++c) q_scaled[i * E + c] = q_head[i * a.q_strides.row + c] * scale;
              fast_transpose(L, E, q_head, a.q_strides.row, q_t.data(), L);
              fast_transpose(L, Ev, grad_out_head, go_row, grad_out_t.data(), L);
              prepared_head = bh;
            }
            for (int64_t i0 = (std::max<int64_t>(i_lo, 0) / kQueryTile) * kQueryTile; i0 <= i_hi; i0 += kQueryTile) {
              const int64_t rows = std::min(kQueryTile, L - i0);
              // Keys past the last one this tile's last row may attend to are masked for all its rows (the
              // bound grows with the row): the products stop there, rounded up to 32 keys (on a causal
              // diagonal the first query tile of a key tile sees at most half of it). dQ's product keeps every
              // key of the tile (its strips are packed for them), with dS zero past the live ones.
              const int64_t last_key = allowed_keys(i0 + rows - 1, S, m.causal, m.window_left, m.window_right).last;
              const int64_t live = std::min(cols, std::max<int64_t>(0, last_key + 1 - j0 + 31) / 32 * 32);
              // (strips packed over more than one chunk of E or Ev rows lie N apart: those products keep N)
              const int64_t live_padded = E > kStripChunk || Ev > kStripChunk
                  ? cols_padded : std::min(cols_padded, (live + kStripColumns - 1) / kStripColumns * kStripColumns);
              if (live == 0) continue;
              const T* grad_out = grad_out_head + i0 * go_row;
              const T* lse = a.lse + 2 * (bh * L + i0);
              // P = exp((scores - max) - log sum), recomputed; two terms, as one log-sum-exp number would lose
              // the sum under a huge additive mask (-1e9 padding).
              if constexpr (std::is_same_v<T, float>)
                if (strips)
                  strip_gemm(rows, live_padded, E, q_scaled.data() + i0 * E, E, key_strips.data(), probs.data(),
                             kKeyTile, false);
              if (!strips)
                gemm(rows, live, E, q_scaled.data() + i0 * E, E, key_t.data(), cols, probs.data(), kKeyTile, false);
              finish_scores(probs.data(), kKeyTile, rows, live, i0, j0, b, h, s, m, T(1));
              for (int64_t r = 0; r < rows; ++r) {
                T* p = probs.data() + r * kKeyTile;
                if (lse[2 * r] == neg_inf<T>()) {
                  std::fill(p, p + live, T(0));
                } else {
                  for (int64_t c = 0; c < live; ++c) p[c] -= lse[2 * r];
                  exp_shifted(p, live, lse[2 * r + 1]);
                }
              }
              // dV^T += dO^T (P with dropout)
              const T* kept = probs.data();
              if (dropout) {
                for (int64_t r = 0; r < rows; ++r) {
                  T* pd = dprobs.data() + r * kKeyTile;
                  std::copy(probs.data() + r * kKeyTile, probs.data() + r * kKeyTile + live, pd);
                  apply_dropout(pd, live, m, (uint64_t(bh) * L + i0 + r) * S + j0, keep_scale, threshold);
                }
                kept = dprobs.data();
              }
              if constexpr (std::is_same_v<T, float>)
                if (strips) {
                  pack_tile_strips(rows, live, live_padded, kept, kKeyTile, kept_strips.data());
                  strip_gemm(Ev, live_padded, rows, grad_out_t.data() + i0, L, kept_strips.data(), dv_t.data(),
                             ld_d, true);
                  strip_gemm(rows, live_padded, Ev, grad_out, go_row, value_strips.data(), dprobs.data(), kKeyTile,
                             false);
                }
              if (!strips) {
                gemm(Ev, live, rows, grad_out_t.data() + i0, L, kept, kKeyTile, dv_t.data(), cols, true);
                // dP = dO V^T (through the dropout mask), dS = P * (dP - D)
                gemm(rows, live, Ev, grad_out, go_row, value_t.data(), cols, dprobs.data(), kKeyTile, false);
              }
              for (int64_t r = 0; r < rows; ++r) {
                const T* p = probs.data() + r * kKeyTile;
                T* ds = dprobs.data() + r * kKeyTile;
                if (dropout)
                  apply_dropout(ds, live, m, (uint64_t(bh) * L + i0 + r) * S + j0, keep_scale, threshold);
                const T d = row_dot[bh * L + i0 + r];
                for (int64_t c = 0; c < live; ++c) ds[c] = p[c] * (ds[c] - d);
                std::fill(ds + live, ds + cols, T(0));
                if (a.grad_mask != nullptr)  // (zero past the live keys, as allocated)
                  std::copy(ds, ds + live, a.grad_mask + (bh * L + i0 + r) * S + j0);
              }
              // dQ += dS K and dK^T += Q^T dS, both without the scale (applied once at the end)
              if constexpr (std::is_same_v<T, float>)
                if (strips) {
                  strip_gemm(rows, E, cols, dprobs.data(), kKeyTile, key_rows.data(), dq_base + (bh * L + i0) * E,
                             E, true);
                  pack_tile_strips(rows, live, live_padded, dprobs.data(), kKeyTile, ds_strips.data());
                  strip_gemm(E, live_padded, rows, q_t.data() + i0, L, ds_strips.data(), dk_t.data(), ld_d, true);
                  continue;
                }
              gemm(rows, E, live, dprobs.data(), kKeyTile, k + j0 * a.k_strides.row, a.k_strides.row,
                   dq_base + (bh * L + i0) * E, E, true);
              gemm(E, live, rows, q_t.data() + i0, L, dprobs.data(), kKeyTile, dk_t.data(), cols, true);
            }
          }
          T* grad_k = a.grad_k + (head * S + j0) * E;
          T* grad_v = a.grad_v + (head * S + j0) * Ev;
          fast_transpose(E, cols, dk_t.data(), ld_d, grad_k, E);
          fast_transpose(Ev, cols, dv_t.data(), ld_d, grad_v, Ev);
          for (int64_t x = 0; x < cols * E; ++x) grad_k[x] *= scale;
        }
      }
    }
  });

  if (split_keys) {
    parallel_for(total_rows * E, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        T acc = 0;
        for (int t = 0; t < threads; ++t) acc += private_dq[size_t(t) * total_rows * E + x];
        a.grad_q[x] = acc * scale;
      }
    });
  } else {
    parallel_for(total_rows * E, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) a.grad_q[x] *= scale;
    });
  }
}

}  // namespace

void sdpa_forward(const SdpaForwardArgs<float>& args) { forward_impl(args); }
void sdpa_forward(const SdpaForwardArgs<double>& args) { forward_impl(args); }
void sdpa_backward(const SdpaBackwardArgs<float>& args) { backward_impl(args); }
void sdpa_backward(const SdpaBackwardArgs<double>& args) { backward_impl(args); }

}  // namespace fl::FL_ISA
