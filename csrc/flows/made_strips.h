// The MADE's products on builds with the strip kernel (common/strip_gemm.h: AVX2 or AVX-512). Units are sorted by
// degree, so each masked weight is block-triangular; packed into strips (16 columns on AVX2, 32 on AVX-512) that
// keep only the rows a strip can reach, the products skip the masked-out blocks at strip granularity and run a
// register tile of kTileRows rows:
//   forward   z  = a W^T + bias  strips over output units, rows [0, extent of the strip's last unit)
//   backward  dA = dZ W          strips over input units, rows [first unit that reads them, out)
//             dW^T += A^T dZ     accumulated in the forward's layout
// One oneDNN micro-kernel call per 32-unit block and slab cost about half of a MAF forward at hidden 256 here.
// Include only from kernel files (compiled once per ISA).
#pragma once

#include "common/strip_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fl::FL_ISA {

// Where one layer's strips lie in its buffer (offsets in floats). Strip s holds the product's columns
// [kStripColumns s, kStripColumns (s + 1)) (zero past the last) and the rows [first[s], first[s] + rows(s)) of
// the right operand, kStripColumns floats per row.
struct MadeStripLayout {
  int64_t columns = 0;
  std::vector<int64_t> offset;  // [strips + 1]
  std::vector<int64_t> first;   // [strips]

  int64_t strips() const { return static_cast<int64_t>(first.size()); }
  int64_t rows(int64_t s) const { return (offset[s + 1] - offset[s]) / kStripColumns; }
  int64_t floats() const { return offset.back(); }

  // Strip s reads rows [first(s), last(s)).
  template <typename First, typename Last>
  void place(int64_t cols, First first_row, Last last_row) {
    columns = cols;
    const int64_t strips = (cols + kStripColumns - 1) / kStripColumns;
    offset.assign(strips + 1, 0);
    first.assign(strips, 0);
    for (int64_t s = 0; s < strips; ++s) {
      first[s] = first_row(s);
      offset[s + 1] = offset[s] + std::max<int64_t>(0, last_row(s) - first[s]) * kStripColumns;
    }
  }
};

// The forward's W^T: output unit u reads inputs [0, extent[u]) (non-decreasing).
inline MadeStripLayout made_output_strips(int64_t out_units, const int64_t* extent) {
  MadeStripLayout layout;
  layout.place(out_units, [](int64_t) { return int64_t{0}; },
               [&](int64_t s) { return extent[std::min(out_units, (s + 1) * kStripColumns) - 1]; });
  return layout;
}

// The backward's W: input unit i is read by the output units o with extent[o] > i, a suffix of them.
inline MadeStripLayout made_input_strips(int64_t in_units, int64_t out_units, const int64_t* extent) {
  MadeStripLayout layout;
  layout.place(in_units, [&](int64_t s) { return std::upper_bound(extent, extent + out_units, s * kStripColumns) - extent; },
               [&](int64_t) { return out_units; });
  return layout;
}

// The right operand B, element (k, c) at B[k * row_stride + c * column_stride], into `out` at the layout.
inline void pack_made_strips(const MadeStripLayout& layout, const float* B, int64_t row_stride, int64_t column_stride,
                             float* out) {
  for (int64_t s = 0; s < layout.strips(); ++s) {
    const int64_t c0 = s * kStripColumns, cols = std::min(kStripColumns, layout.columns - c0);
    float* strip = out + layout.offset[s];
    for (int64_t k = 0; k < layout.rows(s); ++k) {
      const float* row = B + (layout.first[s] + k) * row_stride + c0 * column_stride;
      for (int64_t c = 0; c < kStripColumns; ++c) strip[k * kStripColumns + c] = c < cols ? row[c * column_stride] : 0.0f;
    }
  }
}

// A bias [columns] padded to whole strips (zero past the last column), as the tiles start from it.
inline void pad_strip_bias(const MadeStripLayout& layout, const float* bias, float* out) {
  const int64_t padded = layout.strips() * kStripColumns;
  for (int64_t c = 0; c < padded; ++c) out[c] = c < layout.columns ? bias[c] : 0.0f;
}

// Strip s of a weight gradient summed over `count` workers' buffers (made_output_strips' layout over output units,
// K input units), written in the module's unit order and masked: dst[out_perm[o] * K + in_perm[i]] =
// mask[same] * sum. Every entry of the strip's output rows is written (zero outside the strip's input rows).
inline void unpack_made_strip_grad(const MadeStripLayout& layout, int64_t s, const float* const* buffers,
                                   int64_t count, int64_t K, const int64_t* out_perm, const int64_t* in_perm,
                                   const float* mask, float* dst) {
  const int64_t c0 = s * kStripColumns, cols = std::min(kStripColumns, layout.columns - c0);
  const int64_t first = layout.first[s], rows = layout.rows(s);
  float* row[kStripColumns];
  const float* mask_row[kStripColumns];
  for (int64_t c = 0; c < cols; ++c) {
    row[c] = dst + out_perm[c0 + c] * K;
    mask_row[c] = mask + out_perm[c0 + c] * K;
    std::fill(row[c], row[c] + K, 0.0f);
  }
  // Input row by input row: the workers' sums of a strip row are contiguous (a vector add each), and each of the
  // strip's output rows (at most 32, in L1 together) takes one entry.
  float sum[kStripColumns];
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t at = layout.offset[s] + k * kStripColumns;
    for (int64_t c = 0; c < kStripColumns; ++c) sum[c] = 0.0f;
    for (int64_t b = 0; b < count; ++b)
      for (int64_t c = 0; c < kStripColumns; ++c) sum[c] += buffers[b][at + c];
    const int64_t i = in_perm[first + k];
    for (int64_t c = 0; c < cols; ++c) row[c][i] = sum[c] * mask_row[c][i];
  }
}

#if FL_STRIP_PANELS
namespace made_strip_detail {

// Which of a strip's columns exist: the last strip of a layer may be partial.
struct Columns {
  bool full = true;
  bool half = false;  // none in the upper vector: no FMAs there (a MAF output layer of 16 units for D = 8)
  strip_detail::LaneMask lo, hi;
  explicit Columns(int64_t cols)
      : full(cols == kStripColumns),
        half(cols <= strip_detail::kVecFloats),
        lo(strip_detail::first_lanes(cols)),
        hi(strip_detail::first_lanes(cols - strip_detail::kVecFloats)) {}
};

// lo[r] += A[r, 0:K] times the strip's lower vector of columns, r < kRows.
template <int kRows>
__attribute__((always_inline)) inline void fma_rows_lower(int64_t K, const float* A, int64_t lda, const float* B,
                                                          int64_t ldb, strip_detail::Vec (&lo)[kRows]) {
  using namespace strip_detail;
  for (int64_t k = 0; k < K; ++k) {
    const Vec b_lo = vload(B + k * ldb);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) lo[r] = vfma(vbroadcast(A + r * lda + k), b_lo, lo[r]);
  }
}

// How a tile's accumulators start: from a row of kStripColumns floats (a bias or zeros), or from C.
enum class Start { row, c };

// C[kRows x cols] = (start == row ? init : C) + A[kRows x K] B[K x kStripColumns] (B's rows ldb apart).
template <int kRows>
inline void tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, Start start, const float* init,
                 float* C, int64_t ldc, const Columns& cols, bool relu) {
  using namespace strip_detail;
  Vec lo[kRows], hi[kRows];
  if (start == Start::row) {
    const Vec b_lo = vload(init), b_hi = vload(init + kVecFloats);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      lo[r] = b_lo;
      hi[r] = b_hi;
    }
  } else if (cols.full) {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      lo[r] = vload(C + r * ldc);
      hi[r] = vload(C + r * ldc + kVecFloats);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      lo[r] = vmaskload(C + r * ldc, cols.lo);
      hi[r] = vmaskload(C + r * ldc + kVecFloats, cols.hi);
    }
  }
  if (cols.half)
    fma_rows_lower<kRows>(K, A, lda, B, ldb, lo);
  else
    strip_detail::fma_rows<kRows>(K, A, lda, B, ldb, lo, hi);
  if (relu) {  // max(0, x) returns x where x is NaN, as torch.relu does
    const Vec zero = vzero();
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      lo[r] = vmax(zero, lo[r]);
      hi[r] = vmax(zero, hi[r]);
    }
  }
  if (cols.full) {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      vstore(C + r * ldc, lo[r]);
      vstore(C + r * ldc + kVecFloats, hi[r]);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      vmaskstore(C + r * ldc, cols.lo, lo[r]);
      vmaskstore(C + r * ldc + kVecFloats, cols.hi, hi[r]);
    }
  }
}

// All rows of a product, in tiles of up to kTileRows (for_row_tiles).
inline void tiles(int64_t rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, Start start,
                  const float* init, float* C, int64_t ldc, const Columns& cols, bool relu) {
  for_row_tiles(rows, [&](int64_t m0, int64_t n) {
    with_tile_rows(n, [&](auto r) {
      tile<decltype(r)::value>(K, A + m0 * lda, lda, B, ldb, start, init, C + m0 * ldc, ldc, cols, relu);
    });
  });
}

}  // namespace made_strip_detail

// C[rows x columns] = A[rows x K] B (+ bias, padded by pad_strip_bias, or null), then relu if asked, for one
// layer's strips packed at `layout`: strip s reads only the columns [first(s), first(s) + rows(s)) of A. K is
// taken in chunks that keep a strip's rows in L1.
inline void made_strip_product(int64_t rows, const float* A, int64_t lda, const MadeStripLayout& layout,
                               const float* strips, const float* bias, float* C, int64_t ldc, bool relu = false) {
  using namespace made_strip_detail;
  alignas(64) static const float kZeros[kStripColumns] = {};
  for (int64_t s = 0; s < layout.strips(); ++s) {
    const int64_t c0 = s * kStripColumns, K = layout.rows(s);
    const Columns cols(std::min(kStripColumns, layout.columns - c0));
    const float* strip = strips + layout.offset[s];
    const float* init = bias ? bias + c0 : kZeros;
    int64_t k0 = 0;
    do {  // once even when K is 0: the bias (or zeros) alone
      const int64_t kb = std::min(kStripChunk, K - k0);
      tiles(rows, kb, A + layout.first[s] + k0, lda, strip + k0 * kStripColumns, kStripColumns,
            k0 == 0 ? Start::row : Start::c, init, C + c0, ldc, cols, relu && k0 + kb >= K);
      k0 += kb;
    } while (k0 < K);
  }
}

// The weight gradient of one slab: acc (the forward's layout, without bias) (+)= input_t[:, 0:rows] dz over the
// slab's `rows` samples; input_t is [in x rows], dz [rows x columns] (rows ldz apart). `pad` holds rows x kStripColumns
// floats: each strip's columns of dz are copied there (zero past the last column), since rows 1 or 2 KiB apart
// would share a few L1 sets and miss on every tile that passes over them.
inline void made_strip_weight_grad(int64_t rows, const float* input_t, const float* dz, int64_t ldz,
                                   const MadeStripLayout& layout, float* acc, bool accumulate, float* pad) {
  using namespace made_strip_detail;
  alignas(64) static const float kZeros[kStripColumns] = {};
  const Columns full(kStripColumns);
  for (int64_t s = 0; s < layout.strips(); ++s) {
    const int64_t c0 = s * kStripColumns, cols = std::min(kStripColumns, layout.columns - c0);
    if (layout.rows(s) == 0) continue;
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(pad + r * kStripColumns, dz + r * ldz + c0, sizeof(float) * cols);
      std::fill(pad + r * kStripColumns + cols, pad + (r + 1) * kStripColumns, 0.0f);
    }
    tiles(layout.rows(s), rows, input_t, rows, pad, kStripColumns, accumulate ? Start::c : Start::row, kZeros,
          acc + layout.offset[s], kStripColumns, full, false);
  }
}
#else
inline void made_strip_product(int64_t, const float*, int64_t, const MadeStripLayout&, const float*, const float*,
                               float*, int64_t, bool = false) {}
inline void made_strip_weight_grad(int64_t, const float*, const float*, int64_t, const MadeStripLayout&, float*,
                                   bool, float*) {}
#endif

}  // namespace fl::FL_ISA
