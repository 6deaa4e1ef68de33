// CPU kernels of the fused LSTM layer (see lstm_kernel.h). Built once per ISA, inside namespace fl::FL_ISA.
//
// Layout: the gate pre-activations of all steps are one [N x 4H] matrix whose columns are reordered in blocks
// of kUnitBlock hidden units, [i f g o] inside each block, so that one thread owns whole blocks: it runs the
// recurrent GEMM for its columns and the gate math on them with no barrier in between. The input projection
// of every step is one large GEMM before the time loop; the weight gradients are large GEMMs after it.
#include "lstm/lstm_kernel.h"

#include "common/gemm.h"
#include "common/strip_gemm.h"
#include "common/transpose_kernel.h"
#include "common/parallel.h"
#include "common/vec_math.h"
#include "common/workspace.h"
#include "lstm/lstm_math.h"

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

namespace fl::FL_ISA {

namespace {

using at::vec::Vectorized;

constexpr int64_t kUnitBlock = 32;
// A step of fewer FLOPs than this runs on one thread: the barrier between steps costs more than it saves.
constexpr int64_t kMinTeamStepFlops = 1 << 16;
// Rows of input projection computed ahead of the recurrence: large enough for an efficient GEMM, small enough
// for its output to stay in L2/L3 until the steps consume it.
constexpr int64_t kChunkRows = 512;

// The column order of the gate matrix: hidden unit j of gate k lives at column(k, j).
struct GateColumns {
  int64_t hidden;
  int64_t blocks() const { return (hidden + kUnitBlock - 1) / kUnitBlock; }
  int64_t base(int64_t block) const { return 4 * kUnitBlock * block; }
  int64_t width(int64_t block) const { return std::min(kUnitBlock, hidden - block * kUnitBlock); }
  int64_t column(int64_t gate, int64_t unit) const {
    const int64_t block = unit / kUnitBlock;
    return base(block) + gate * width(block) + unit % kUnitBlock;
  }
  // permutation[r] = the column of torch's gate row r (r = gate * H + unit).
  std::vector<int64_t> permutation() const {
    std::vector<int64_t> perm(4 * hidden);
    for (int64_t gate = 0; gate < 4; ++gate)
      for (int64_t unit = 0; unit < hidden; ++unit) perm[gate * hidden + unit] = column(gate, unit);
    return perm;
  }
};

// Whether float gate panels are stored as strips (common/strip_gemm.h): on builds that have the strip kernel,
// when every block's 4 x width columns are a multiple of the strip width, and below 1024 hidden units. From there
// oneDNN's brgemm does better on the weights that far outgrow the caches (H = 2048 inference, alternating runs:
// T=10 B=256 834-1170 ms against 923-1201, T=100 B=32 1218-1414 against 1303-1435).
template <typename T>
bool strip_panels(const GateColumns& columns) {
  return std::is_same_v<T, float> && kStripPanels && columns.hidden % (kStripColumns / 4) == 0 &&
         columns.hidden < 1024;
}

// A gradient computed transposed and in gate-column order, back to torch's layout: dst[r * K + k] = src[k * R + perm[r]].
// Groups of 8 rows whose source columns are consecutive (all of them when H is a multiple of 8) move as one
// transposed copy; other rows element by element.
template <typename T>
void unpack_transposed(int64_t R, int64_t K, const T* src, const std::vector<int64_t>& perm, T* dst) {
  constexpr int64_t kGroup = 8;
  parallel_for((R + kGroup - 1) / kGroup, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin * kGroup; r0 < std::min(R, end * kGroup); r0 += kGroup) {
      const int64_t r1 = std::min(R, r0 + kGroup);
      bool consecutive = r1 - r0 == kGroup;
      for (int64_t r = r0 + 1; r < r1 && consecutive; ++r) consecutive = perm[r] == perm[r0] + (r - r0);
      if (consecutive) {
        fast_transpose(K, kGroup, src + perm[r0], R, dst + r0 * K, K);
        continue;
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < K; ++k) dst[r * K + k] = src[k * R + perm[r]];
    }
  });
}

// A torch weight [4H x K] as the recurrent GEMM's right operand, one contiguous [K x 4 * width] panel per unit
// block (a panel whose rows lie 4H apart would map to the same cache sets and thrash L1 and L2).
template <typename T>
void pack_block_panels(const GateColumns& columns, int64_t K, const T* src, T* dst) {
  const int64_t H = columns.hidden;
  constexpr int64_t kTileK = 16;  // a 16-row strip of the panel stays in L1 while its columns are filled
  parallel_for(columns.blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t width = columns.width(block), ld = 4 * width;
      T* panel = dst + columns.base(block) * K;
      for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
        const int64_t k1 = std::min(K, k0 + kTileK);
        for (int64_t gate = 0; gate < 4; ++gate)
          for (int64_t u = 0; u < width; ++u) {
            const T* row = src + (gate * H + block * kUnitBlock + u) * K;
            T* out = panel + gate * width + u;
            for (int64_t k = k0; k < k1; ++k) out[k * ld] = row[k];
          }
      }
    }
  });
}

// Rows of a GEMM panel for K inputs: bf16 panels pair rows, so K is rounded up to even.
template <typename T>
constexpr int64_t panel_rows(int64_t K) {
  return std::is_same_v<T, bf16> ? (K + 1) / 2 * 2 : K;
}

// A gate weight as GEMM panels in the engine's operand format (bf16: row pairs interleaved).
template <typename T>
void pack_weight_panels(const GateColumns& columns, int64_t K, const T* src, T* dst) {
  if constexpr (std::is_same_v<T, bf16>) {
    std::vector<T> plain(4 * columns.hidden * K);
    pack_block_panels(columns, K, src, plain.data());
    const int64_t rows = panel_rows<T>(K);
    parallel_for(columns.blocks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n = 4 * columns.width(block);
        pack_b_bf16(K, n, plain.data() + columns.base(block) * K, n, dst + columns.base(block) * rows);
      }
    });
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (strip_panels<T>(columns)) {
        std::vector<T> plain(4 * columns.hidden * K);
        pack_block_panels(columns, K, src, plain.data());
        parallel_for(columns.blocks(), 1, [&](int64_t begin, int64_t end) {
          for (int64_t block = begin; block < end; ++block) {
            const int64_t n = 4 * columns.width(block), offset = columns.base(block) * K;
            pack_strips(K, n, plain.data() + offset, n, dst + offset);
          }
        });
        return;
      }
    }
    pack_block_panels(columns, K, src, dst);
  }
}

// C[n x cols] (+)= A[n x K] times one block's panel.
// `descending`: see strip_gemm (float strips only).
template <typename T, typename S>
void panel_gemm(const GateColumns& columns, int64_t n, int64_t cols, int64_t K, const T* A, int64_t lda,
                const T* panel, S* C, int64_t ldc, bool accumulate, bool descending = false) {
  if constexpr (std::is_same_v<T, bf16>) {
    gemm_bf16(n, cols, K, A, lda, panel, cols, 0, C, ldc, accumulate);
  } else if constexpr (std::is_same_v<T, float>) {
    if (strip_panels<T>(columns))
      strip_gemm(n, cols, K, A, lda, panel, C, ldc, accumulate, descending);
    else
      gemm(n, cols, K, A, lda, panel, cols, C, ldc, accumulate);
  } else {
    gemm(n, cols, K, A, lda, panel, cols, C, ldc, accumulate);
  }
}

// Rows of a torch weight [R x K] reordered into gate-column order: dst[perm[r]] = src[r].
template <typename T>
void permute_rows(int64_t R, int64_t K, int64_t ld_dst, const T* src, const std::vector<int64_t>& perm, T* dst) {
  for (int64_t r = 0; r < R; ++r) std::memcpy(dst + perm[r] * ld_dst, src + r * K, sizeof(T) * K);
}

// fast_transpose shared among threads by tiles of source columns (destination rows).
template <typename T>
void transpose_parallel(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kCols = 64;
  parallel_for((cols + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kCols, c1 = std::min(cols, end * kCols);
    fast_transpose(rows, c1 - c0, src + c0, ld_src, dst + c0 * ld_dst, ld_dst);
  });
}

// Row strides that are multiples of 512 bytes put every row of a GEMM panel in the same few cache sets
// (L1 repeats every 4 KiB); one extra cache line per row spreads them.
template <typename T>
int64_t padded_stride(int64_t n) {
  return (n * int64_t(sizeof(T))) % 512 == 0 ? n + 64 / int64_t(sizeof(T)) : n;
}

// With fewer blocks of hidden units than threads (small H), rows are split too, so every thread has work:
// how many row chunks each block's rows are cut into for `rows` rows.
int64_t row_chunks_for(int64_t blocks, int64_t rows, int64_t threads = num_threads()) {
  if (blocks >= threads) return 1;
  return std::max<int64_t>(1, std::min((threads + blocks - 1) / blocks, rows / 8));
}

// Gate math on one block of `width` units of one row: pre-activations (the products, plus `bias` unless null) in,
// activations out (in place), the cell state updated in place and copied to `cell_out`, the cell output written
// to `hidden_out`. The bias is added here, on values already in registers, rather than copied into every row of
// gates before the input projection (a pass over all of them, and a product that must then accumulate).
template <typename S, typename T>
void block_forward(S* gates, const S* bias, int64_t width, S* cell_state, S* cell_out, T* hidden_out) {
  using V = Vectorized<S>;
  for (int64_t j = 0; j < width; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), width - j);
    V pre_i = V::loadu(gates + j, n), pre_f = V::loadu(gates + width + j, n);
    V pre_g = V::loadu(gates + 2 * width + j, n), pre_o = V::loadu(gates + 3 * width + j, n);
    if (bias != nullptr) {
      pre_i = pre_i + V::loadu(bias + j, n);
      pre_f = pre_f + V::loadu(bias + width + j, n);
      pre_g = pre_g + V::loadu(bias + 2 * width + j, n);
      pre_o = pre_o + V::loadu(bias + 3 * width + j, n);
    }
    const V c_prev = V::loadu(cell_state + j, n);
    V i, f, g, o, c, h;
    lstm_cell_forward_math(pre_i, pre_f, pre_g, pre_o, c_prev, i, f, g, o, c, h);
    i.store(gates + j, n);
    f.store(gates + width + j, n);
    g.store(gates + 2 * width + j, n);
    o.store(gates + 3 * width + j, n);
    c.store(cell_state + j, n);
    if (cell_out != nullptr) c.store(cell_out + j, n);
    if constexpr (std::is_same_v<S, T>) {
      h.store(hidden_out + j, n);
    } else {  // bfloat16 layers: the cell output is rounded once, here
      S tmp[V::size()];
      h.store(tmp, n);
      for (int64_t k = 0; k < n; ++k) hidden_out[j + k] = static_cast<T>(tmp[k]);
    }
  }
}

// Backward of block_forward: reads the activations in `gates` and writes the pre-activation gradients to
// `grad_gates` (the same layout); the cell gradient is updated in place (from dL/dc_t to dL/dc_{t-1}). The
// cell output's gradient is grad_hidden, plus grad_output unless it is null (the layer output's gradient, added
// here rather than in a pass of its own). The gradients are also added to `bias_grad` (same layout) unless it is
// null: the bias gradient sums them over all rows, and here they are still in registers (a pass over all of them
// after the loop took 2 ms of a 160 ms step).
template <typename T>
void block_backward(const T* gates, T* grad_gates, int64_t width, const T* grad_hidden, const T* grad_output,
                    T* grad_cell, const T* cell, const T* cell_prev, T* bias_grad) {
  using V = Vectorized<T>;
  for (int64_t j = 0; j < width; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), width - j);
    const V i = V::loadu(gates + j, n), f = V::loadu(gates + width + j, n);
    const V g = V::loadu(gates + 2 * width + j, n), o = V::loadu(gates + 3 * width + j, n);
    V di, df, dg, do_, dc_prev;
    V dh = V::loadu(grad_hidden + j, n);
    if (grad_output != nullptr) dh = dh + V::loadu(grad_output + j, n);
    lstm_cell_backward_math(dh, V::loadu(grad_cell + j, n), i, f, g, o,
                            V::loadu(cell + j, n), V::loadu(cell_prev + j, n), di, df, dg, do_, dc_prev);
    di.store(grad_gates + j, n);
    df.store(grad_gates + width + j, n);
    dg.store(grad_gates + 2 * width + j, n);
    do_.store(grad_gates + 3 * width + j, n);
    dc_prev.store(grad_cell + j, n);
    if (bias_grad != nullptr) {
      (V::loadu(bias_grad + j, n) + di).store(bias_grad + j, n);
      (V::loadu(bias_grad + width + j, n) + df).store(bias_grad + width + j, n);
      (V::loadu(bias_grad + 2 * width + j, n) + dg).store(bias_grad + 2 * width + j, n);
      (V::loadu(bias_grad + 3 * width + j, n) + do_).store(bias_grad + 3 * width + j, n);
    }
  }
}

struct StepTable {
  std::vector<int64_t> offset;  // offset[t] = first row of step t; offset[T] = N
  std::vector<int64_t> batch;   // batch[t]
  explicit StepTable(const LstmLayerSizes& s, const int64_t* batch_sizes)
      : offset(s.steps + 1, 0), batch(batch_sizes, batch_sizes + s.steps) {
    for (int64_t t = 0; t < s.steps; ++t) offset[t + 1] = offset[t] + batch[t];
  }
};

// Projection h = r W_hr^T for the n rows of one step: this team member's share of the column tiles.
template <typename T>
void project_rows(int64_t n, int64_t H, int64_t P, const T* raw, const T* w_hr_t, T* out, int rank, int size) {
  constexpr int64_t kTile = 64;
  int64_t tile0, tile1;
  split_range((P + kTile - 1) / kTile, size, rank, tile0, tile1);
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t p0 = tile * kTile, width = std::min(kTile, P - p0);
    gemm(n, width, H, raw, H, w_hr_t + p0, P, out + p0, P, false);
  }
}

template <typename T>
void forward_impl(const LstmLayerForwardArgs<T>& a) {
  using S = lstm_state_t<T>;  // gates, cell states and GEMM accumulators
  const LstmLayerSizes& s = a.sizes;
  const int64_t H = s.hidden_size, P = s.output_size, I = s.input_size, G4 = 4 * H;
  const int64_t LG = lstm_gates_stride(H, sizeof(S));
  const int64_t rows_i = panel_rows<T>(I), rows_p = panel_rows<T>(P);
  const GateColumns columns{H};
  const std::vector<int64_t> perm = columns.permutation();
  const StepTable steps(s, a.batch_sizes);
  const int64_t blocks = columns.blocks();

  const T* w_ih_t = a.w_ih_packed;
  const T* w_hh_t = a.w_hh_packed;
  if (w_ih_t == nullptr) {
    T* packed = workspace<T>(WorkspaceSlot::w_ih, rows_i * G4);
    pack_weight_panels(columns, I, a.w_ih, packed);
    w_ih_t = packed;
  }
  if (w_hh_t == nullptr) {
    T* packed = workspace<T>(WorkspaceSlot::w_hh, rows_p * G4);
    pack_weight_panels(columns, P, a.w_hh, packed);
    w_hh_t = packed;
  }
  T* w_hr_t = s.has_proj ? workspace<T>(WorkspaceSlot::w_hr, H * P) : nullptr;
  if (s.has_proj) fast_transpose(P, H, a.w_hr, H, w_hr_t, P);
  std::vector<S> bias(s.has_bias ? G4 : 0);
  for (int64_t r = 0; r < G4 && s.has_bias; ++r) bias[perm[r]] = S(a.b_ih[r]) + S(a.b_hh[r]);

  // The input projection runs a chunk of steps at a time, so that its output is still in cache when the
  // steps read it; in inference only one chunk of gates is ever stored.
  const int64_t chunk_steps = std::max<int64_t>(1, kChunkRows / std::max<int64_t>(1, s.batch));
  const int64_t chunk_rows_max = std::min(s.rows, chunk_steps * s.batch);
  S* chunk_scratch = a.gates == nullptr ? workspace<S>(WorkspaceSlot::gates, chunk_rows_max * LG) : nullptr;
  S* raw_scratch = s.has_proj && a.raw_hidden == nullptr ? workspace<S>(WorkspaceSlot::raw, s.batch * H) : nullptr;
  S* cell_state = workspace<S>(WorkspaceSlot::state_c, s.batch * H);  // updated in place
  for (int64_t k = 0; k < s.batch * H; ++k) cell_state[k] = S(a.c0[k]);

  // One parallel region for the whole loop: the team shares each step's blocks of units and meets at a barrier
  // between steps (a region per step would cost microseconds of every small step).
  const int64_t team = 2 * s.batch * G4 * P >= kMinTeamStepFlops ? num_threads() : 1;
  parallel_team(team, [&](int rank, int size, TeamBarrier& barrier) {
    for (int64_t chunk0 = 0; chunk0 < s.steps; chunk0 += chunk_steps) {
      const int64_t chunk1 = std::min(s.steps, chunk0 + chunk_steps);
      // The time steps of this chunk form one contiguous range of rows, in either direction.
      const int64_t t_lo = s.reverse ? s.steps - chunk1 : chunk0, t_hi = s.reverse ? s.steps - chunk0 : chunk1;
      const int64_t row_lo = steps.offset[t_lo], chunk_rows = steps.offset[t_hi] - row_lo;
      S* gates_chunk = a.gates != nullptr ? a.gates + row_lo * LG : chunk_scratch;
      const int64_t proj_chunks = row_chunks_for(blocks, chunk_rows, size);
      int64_t item0, item1;
      split_range(blocks * proj_chunks, size, rank, item0, item1);
      for (int64_t item = item0; item < item1; ++item) {
        const int64_t block = item % blocks, base = columns.base(block), width = columns.width(block);
        int64_t r0, r1;
        split_range(chunk_rows, proj_chunks, item / blocks, r0, r1);
        panel_gemm(columns, r1 - r0, 4 * width, I, a.input + (row_lo + r0) * I, I, w_ih_t + base * rows_i,
                   gates_chunk + r0 * LG + base, LG, false);
      }
      barrier.wait(size);

      for (int64_t step = chunk0; step < chunk1; ++step) {
        const int64_t t = s.reverse ? s.steps - 1 - step : step;
        const int64_t n = steps.batch[t], row0 = steps.offset[t];
        // h_{t-1}: rows that ran the previous step read its output; rows that start here (the reverse
        // direction of a packed batch) read h0.
        const T* h_prev = a.h0;
        int64_t ran_before = 0;
        if (step > 0) {
          const int64_t tp = s.reverse ? t + 1 : t - 1;
          h_prev = a.output + steps.offset[tp] * P;
          ran_before = std::min(n, steps.batch[tp]);
        }
        S* gates_t = gates_chunk + (row0 - row_lo) * LG;
        S* cells_t = a.cells != nullptr ? a.cells + row0 * H : nullptr;
        S* raw_t = s.has_proj ? (a.raw_hidden != nullptr ? a.raw_hidden + row0 * H : raw_scratch) : nullptr;
        const int64_t step_chunks = row_chunks_for(blocks, n, size);
        split_range(blocks * step_chunks, size, rank, item0, item1);
        // Every other step runs its blocks, and each product's inner dimension, backwards: the weights it
        // streams from L2 start with those the previous step read last, still in L1 (a small batch's step is
        // bound by that stream). Each sum then runs in the other order: the same values to rounding.
        const bool backwards = (step & 1) != 0;
        for (int64_t i = item0; i < item1; ++i) {
          const int64_t item = backwards ? item1 - 1 - (i - item0) : i;
          const int64_t block = item % blocks;
          const int64_t base = columns.base(block), width = columns.width(block), unit0 = block * kUnitBlock;
          const S* gate_bias = s.has_bias ? bias.data() + base : nullptr;
          int64_t b0, b1;
          split_range(n, step_chunks, item / blocks, b0, b1);
          const int64_t split = std::clamp(ran_before, b0, b1);
          if (split > b0)
            panel_gemm(columns, split - b0, 4 * width, P, h_prev + b0 * P, P, w_hh_t + base * rows_p,
                       gates_t + b0 * LG + base, LG, true, backwards);
          if (b1 > split)
            panel_gemm(columns, b1 - split, 4 * width, P, a.h0 + split * P, P, w_hh_t + base * rows_p,
                       gates_t + split * LG + base, LG, true, backwards);
          for (int64_t b = b0; b < b1; ++b) {
            S* cell_out = cells_t != nullptr ? cells_t + b * H + unit0 : nullptr;
            S* state = cell_state + b * H + unit0;
            if (s.has_proj)
              block_forward(gates_t + b * LG + base, gate_bias, width, state, cell_out, raw_t + b * H + unit0);
            else
              block_forward(gates_t + b * LG + base, gate_bias, width, state, cell_out,
                            a.output + (row0 + b) * P + unit0);
          }
        }
        if constexpr (std::is_same_v<S, T>) {  // (no projection in reduced precision: the op layer runs
          if (s.has_proj) {                      // those in float) the projection needs every unit of the step
            barrier.wait(size);
            project_rows(n, H, P, raw_t, w_hr_t, a.output + row0 * P, rank, size);
          }
        }
        barrier.wait(size);
      }
    }
  });

  for (int64_t k = 0; k < s.batch * H; ++k) a.c_n[k] = static_cast<T>(cell_state[k]);
  // h_n: each sequence's output at the last step it ran (step 0 for the reverse direction).
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t t_last = 0;
    if (!s.reverse)
      while (t_last + 1 < s.steps && steps.batch[t_last + 1] > b) ++t_last;
    const T* src = s.steps > 0 ? a.output + (steps.offset[t_last] + b) * P : a.h0 + b * P;
    std::memcpy(a.h_n + b * P, src, sizeof(T) * P);
  }
}

// The left operand of W_hh's gradient: h_{t-1} of every row (h0 where a sequence starts), transposed into
// left [P x N] (rows ld apart).
template <typename T>
void transpose_previous_hidden(const LstmLayerBackwardArgs<T>& a, const StepTable& steps, T* left, int64_t ld) {
  const LstmLayerSizes& s = a.sizes;
  const int64_t P = s.output_size;
  parallel_for(s.steps, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.batch * P)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tp = s.reverse ? t + 1 : t - 1;
      const int64_t n_prev = (tp >= 0 && tp < s.steps) ? steps.batch[tp] : 0;
      const int64_t n = steps.batch[t], m = std::min(n, n_prev);
      if (m > 0) fast_transpose(m, P, a.output + steps.offset[tp] * P, P, left + steps.offset[t], ld);
      if (n > m) fast_transpose(n - m, P, a.h0 + m * P, P, left + steps.offset[t] + m, ld);
    }
  });
}

// grad_bias[r] = the sum of the row chunks' bias gradients at column perm[r] (gate-column order back to torch's).
template <typename T>
void sum_bias_parts(const std::vector<T>& parts, int64_t G4, const std::vector<int64_t>& perm, T* grad_bias) {
  const int64_t chunks = static_cast<int64_t>(parts.size()) / G4;
  for (int64_t r = 0; r < G4; ++r) {
    T sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += parts[c * G4 + perm[r]];
    grad_bias[r] = sum;
  }
}

// Rows [0, rows) of src (ld_src apart, float) rounded to bf16 into dst (ld_dst apart), in parallel.
void round_rows_bf16(int64_t rows, int64_t cols, const float* src, int64_t ld_src, bf16* dst, int64_t ld_dst) {
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) at::vec::convert(src + r * ld_src, dst + r * ld_dst, cols);
  });
}

// W_hh for the recurrent product on the bf16 GEMM: its float copy in gate-column order, cut into column panels of
// `panel` columns ([G4 x width] each, as the float product reads it), rounded and packed as one [G4 x P] operand.
void pack_gate_rows_bf16(int64_t G4, int64_t P, const float* panels, int64_t panel, bf16* out) {
  std::vector<bf16> rows(G4 * P);
  for (int64_t p0 = 0; p0 < P; p0 += panel) {
    const int64_t width = std::min(panel, P - p0);
    for (int64_t r = 0; r < G4; ++r) at::vec::convert(panels + p0 * G4 + r * width, rows.data() + r * P + p0, width);
  }
  pack_b_bf16(G4, P, rows.data(), P, out);
}

// The gradients that sum over all steps for a bf16 layer (LstmLayerBackwardArgs::bf16_products; no projection):
// grad_input = dG W_ih, dW_ih = X^T dG, dW_hh = H_prev^T dG on the bf16 GEMM, and the bias gradient, from the
// gate gradients [N x LG] (float) and W_ih in gate-column order (w_ih_p, rows LI apart).
void summed_gradients_bf16(const LstmLayerBackwardArgs<float>& a, const StepTable& steps,
                           const std::vector<int64_t>& perm, const float* grad_gates, const bf16* grads16,
                           const float* w_ih_p) {
  const LstmLayerSizes& s = a.sizes;
  const int64_t H = s.hidden_size, P = s.output_size, I = s.input_size, G4 = 4 * H, N = s.rows;
  const int64_t LG = lstm_gates_stride(H, sizeof(float)), LI = padded_stride<float>(I);
  // dG in bf16 (rounded step by step, [N x G4]): plain, the left operand of grad_input; packed, the right operand
  // of both weight gradients.
  bf16* grads_packed = workspace<bf16>(WorkspaceSlot::state_h, packed_b_bf16_size(N, G4));
  pack_b_bf16_parallel(N, G4, grads16, grads_packed);

  std::vector<bf16> w16(G4 * I), w_packed(packed_b_bf16_size(G4, I));
  round_rows_bf16(G4, I, w_ih_p, LI, w16.data(), I);
  pack_b_bf16(G4, I, w16.data(), I, w_packed.data());
  gemm_parallel_bf16(N, I, G4, grads16, G4, w_packed.data(), a.grad_input, I);

  // Left operands transposed [features x N] (bf16: exact, the layer's values are bf16 already).
  const int64_t LN = padded_stride<float>(N);
  float* left = workspace<float>(WorkspaceSlot::left, std::max(I, P) * LN);
  bf16* left16 = workspace<bf16>(WorkspaceSlot::state_c, std::max(I, P) * N);
  float* product = workspace<float>(WorkspaceSlot::product, std::max(I, P) * G4);
  transpose_parallel(N, I, a.input, I, left, LN);
  round_rows_bf16(I, N, left, LN, left16, N);
  gemm_parallel_bf16(I, G4, N, left16, N, grads_packed, product, G4);
  unpack_transposed(G4, I, product, perm, a.grad_w_ih);

  transpose_previous_hidden(a, steps, left, LN);
  round_rows_bf16(P, N, left, LN, left16, N);
  gemm_parallel_bf16(P, G4, N, left16, N, grads_packed, product, G4);
  unpack_transposed(G4, P, product, perm, a.grad_w_hh);
}

template <typename T>
void backward_impl(const LstmLayerBackwardArgs<T>& a) {
  const LstmLayerSizes& s = a.sizes;
  const int64_t H = s.hidden_size, P = s.output_size, I = s.input_size, G4 = 4 * H, N = s.rows;
  const int64_t LG = lstm_gates_stride(H, sizeof(T));
  const GateColumns columns{H};
  const std::vector<int64_t> perm = columns.permutation();
  const StepTable steps(s, a.batch_sizes);

  const int64_t LI = padded_stride<T>(I);
  // Scratch from the per-thread workspace: fresh multi-megabyte buffers would cost a page fault per 4 KiB at
  // every call (and a zero fill, as std::vectors).
  T* w_hh_p = workspace<T>(WorkspaceSlot::w_hh, G4 * P);
  T* w_ih_p = workspace<T>(WorkspaceSlot::w_ih, G4 * LI);
  // The gate gradients of every row, [N x LG] like the saved gates (which stay untouched).
  T* grad_gates = workspace<T>(WorkspaceSlot::grad, N * LG);
  // W_hh for dL/dh_{t-1} = dL/dgates_t W_hh: rows in gate-column order, cut into contiguous column panels.
  constexpr int64_t kTile = 128;
  const int64_t p_tiles = (P + kTile - 1) / kTile;
  parallel_for(p_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t p0 = tile * kTile, width = std::min(kTile, P - p0);
      T* panel = w_hh_p + p0 * G4;
      for (int64_t r = 0; r < G4; ++r) std::memcpy(panel + perm[r] * width, a.w_hh + r * P + p0, sizeof(T) * width);
    }
  });
  permute_rows(G4, I, LI, a.w_ih, perm, w_ih_p);

  // Running gradients of h_{t-1} and c_{t-1}; rows not yet reached hold grad_h_n / grad_c_n, and rows that
  // are finished hold their gradients of h0 / c0.
  T* grad_hidden = a.grad_h0;
  T* grad_cell = a.grad_c0;
  std::memcpy(grad_hidden, a.grad_h_n, sizeof(T) * s.batch * P);
  std::memcpy(grad_cell, a.grad_c_n, sizeof(T) * s.batch * H);
  T* grad_out_all = s.has_proj ? workspace<T>(WorkspaceSlot::hidden_prev, N * P) : nullptr;  // dL/dh_t, for dW_hh
  // bf16 products (LstmLayerBackwardArgs::bf16_products): each step's gate gradients rounded to bf16 as they are
  // made (also the left operand of grad_input later), and W_hh in gate-column order packed for the bf16 GEMM.
  const bool products16 = std::is_same_v<T, float> && a.bf16_products;
  bf16* grads16 = products16 ? workspace<bf16>(WorkspaceSlot::gates, N * G4) : nullptr;
  std::vector<bf16> w_hh16(products16 ? packed_b_bf16_size(G4, P) : 0);
  if constexpr (std::is_same_v<T, float>)
    if (products16) pack_gate_rows_bf16(G4, P, w_hh_p, kTile, w_hh16.data());
  T* grad_raw = s.has_proj ? workspace<T>(WorkspaceSlot::raw, s.batch * H) : nullptr;
  const int64_t blocks = columns.blocks();
  // The bias gradient, summed as the gate gradients are made: a [G4] sum per row chunk of the gate step (each
  // (block, chunk) item of a step is one thread's, and a step has at most as many chunks as the widest step).
  std::vector<T> bias_parts(a.grad_bias != nullptr ? row_chunks_for(blocks, s.batch, num_threads()) * G4 : 0, T(0));

  // One parallel region for the whole loop, as in the forward: the team shares each phase of a step and meets
  // at a barrier between phases, where two OpenMP regions per step each had to wake the other thread.
  const int64_t team = 2 * s.batch * G4 * P >= kMinTeamStepFlops ? num_threads() : 1;
  parallel_team(team, [&](int rank, int size, TeamBarrier& barrier) {
    for (int64_t step = 0; step < s.steps; ++step) {
      const int64_t t = s.reverse ? step : s.steps - 1 - step;
      const int64_t n = steps.batch[t], row0 = steps.offset[t];
      const int64_t tp = s.reverse ? t + 1 : t - 1;
      const bool has_prev = tp >= 0 && tp < s.steps;
      const int64_t n_prev = has_prev ? steps.batch[tp] : 0;
      int64_t item0, item1;

      // dL/d(o * tanh(c)) of this step: grad_hidden (dL/dh_t through the next step) plus the output's gradient,
      // added by block_backward; with a projection, both summed first for dL/dW_hr and the projection's backward.
      const T* grad_out_t = a.grad_output + row0 * P;
      const T* grad_cell_output = grad_hidden;
      const T* grad_cell_extra = grad_out_t;
      int64_t ld_grad = P;
      if (s.has_proj) {
        if (rank == 0) {
          for (int64_t i = 0; i < n * P; ++i) grad_hidden[i] += grad_out_t[i];
          std::memcpy(grad_out_all + row0 * P, grad_hidden, sizeof(T) * n * P);
        }
        barrier.wait(size);
        const int64_t h_tiles = (H + kTile - 1) / kTile;
        split_range(h_tiles, size, rank, item0, item1);
        for (int64_t tile = item0; tile < item1; ++tile) {
          const int64_t h0 = tile * kTile, width = std::min(kTile, H - h0);
          gemm(n, width, P, grad_hidden, P, a.w_hr + h0, H, grad_raw + h0, H, false);
        }
        barrier.wait(size);
        grad_cell_extra = nullptr;
        grad_cell_output = grad_raw;
        ld_grad = H;
      }

      const T* gates_t = a.gates + row0 * LG;
      T* grad_gates_t = grad_gates + row0 * LG;
      const T* cells_t = a.cells + row0 * H;
      const int64_t back_chunks = row_chunks_for(blocks, n, size);
      split_range(blocks * back_chunks, size, rank, item0, item1);
      for (int64_t item = item0; item < item1; ++item) {
        const int64_t block = item % blocks;
        const int64_t base = columns.base(block), width = columns.width(block), unit0 = block * kUnitBlock;
        int64_t b0, b1;
        split_range(n, back_chunks, item / blocks, b0, b1);
        for (int64_t b = b0; b < b1; ++b) {
          const T* cell_prev = b < n_prev ? a.cells + (steps.offset[tp] + b) * H : a.c0 + b * H;
          block_backward(gates_t + b * LG + base, grad_gates_t + b * LG + base, width,
                         grad_cell_output + b * ld_grad + unit0,
                         grad_cell_extra != nullptr ? grad_cell_extra + b * P + unit0 : nullptr,
                         grad_cell + b * H + unit0, cells_t + b * H + unit0, cell_prev + unit0,
                         bias_parts.empty() ? nullptr : bias_parts.data() + (item / blocks) * G4 + base);
          if constexpr (std::is_same_v<T, float>)
            if (products16)
              at::vec::convert(grad_gates_t + b * LG + base, grads16 + (row0 + b) * G4 + base, 4 * width);
        }
      }
      barrier.wait(size);
      // dL/dh_{t-1} = dL/dgates_t W_hh, for the rows of this step.
      const int64_t dh_chunks = row_chunks_for(p_tiles, n, size);
      split_range(p_tiles * dh_chunks, size, rank, item0, item1);
      for (int64_t item = item0; item < item1; ++item) {
        const int64_t tile = item % p_tiles, p0 = tile * kTile, width = std::min(kTile, P - p0);
        int64_t b0, b1;
        split_range(n, dh_chunks, item / p_tiles, b0, b1);
        if constexpr (std::is_same_v<T, float>)
          if (products16) {
            gemm_bf16(b1 - b0, width, G4, grads16 + (row0 + b0) * G4, G4, w_hh16.data(), P, p0,
                      grad_hidden + b0 * P + p0, P, false);
            continue;
          }
        gemm(b1 - b0, width, G4, grad_gates_t + b0 * LG, LG, w_hh_p + p0 * G4, width, grad_hidden + b0 * P + p0,
             P, false);
      }
      barrier.wait(size);
    }
  });

  if (a.grad_bias != nullptr) sum_bias_parts(bias_parts, G4, perm, a.grad_bias);
  if constexpr (std::is_same_v<T, float>)
    if (products16) return summed_gradients_bf16(a, steps, perm, grad_gates, grads16, w_ih_p);

  // Gradients that sum over all steps, as large GEMMs.
  gemm_parallel(N, I, G4, grad_gates, LG, w_ih_p, LI, a.grad_input, I, false);

  // dW_ih and dW_hh as one product: [X^T; H_prev^T] ([I + P] x N, rows padded: see padded_stride) times the
  // gate gradients, which are then read once, in one GEMM with more rows to share each panel of them.
  const int64_t LN = padded_stride<T>(N);
  T* left = workspace<T>(WorkspaceSlot::left, (I + P) * LN);
  T* product = workspace<T>(WorkspaceSlot::product, (I + P) * G4);
  transpose_parallel(N, I, a.input, I, left, LN);
  transpose_previous_hidden(a, steps, left + I * LN, LN);
  gemm_parallel(I + P, G4, N, left, LN, grad_gates, LG, product, G4, false);
  unpack_transposed(G4, I, product, perm, a.grad_w_ih);
  unpack_transposed(G4, P, product + I * G4, perm, a.grad_w_hh);
  if (s.has_proj) {
    transpose_parallel(N, P, grad_out_all, P, left, LN);
    gemm_parallel(P, H, N, left, LN, a.raw_hidden, H, a.grad_w_hr, H, false);
  }
}

}  // namespace

void lstm_pack_weight(const float* w, int64_t hidden, int64_t cols, float* out) {
  pack_weight_panels(GateColumns{hidden}, cols, w, out);
}
void lstm_pack_weight(const double* w, int64_t hidden, int64_t cols, double* out) {
  pack_weight_panels(GateColumns{hidden}, cols, w, out);
}
void lstm_pack_weight(const bf16* w, int64_t hidden, int64_t cols, bf16* out) {
  pack_weight_panels(GateColumns{hidden}, cols, w, out);
}
void lstm_layer_forward(const LstmLayerForwardArgs<bf16>& args) { forward_impl(args); }
void lstm_layer_forward(const LstmLayerForwardArgs<float>& args) { forward_impl(args); }
void lstm_layer_forward(const LstmLayerForwardArgs<double>& args) { forward_impl(args); }
void lstm_layer_backward(const LstmLayerBackwardArgs<float>& args) { backward_impl(args); }
void lstm_layer_backward(const LstmLayerBackwardArgs<double>& args) { backward_impl(args); }

}  // namespace fl::FL_ISA
