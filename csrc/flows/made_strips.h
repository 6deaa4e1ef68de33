// The MADE forward's products on builds with the AVX2 strip kernel (common/strip_gemm.h): each layer's sorted,
// masked, transposed weight packed into 16-column strips that keep only the rows their units can see, so the
// masked-out blocks are skipped at 16-unit granularity, and a 6 x 16 register tile that starts from the bias.
// One oneDNN micro-kernel call per 32-unit block and slab cost about half of a MAF forward at hidden 256 here.
// Include only from kernel files (compiled once per ISA).
#pragma once

#include "common/strip_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fl::FL_ISA {

// Where one layer's strips lie in a shared buffer (offsets in floats). Strip s holds the sorted units
// [16 s, 16 s + 16) and the rows [0, extent of its last unit), each row 16 floats (zero past the last unit).
struct MadeStripLayout {
  int64_t units = 0;
  std::vector<int64_t> offset;  // [strips + 1]
  int64_t bias_offset = 0;      // 16 floats per strip, zero past the last unit
  int64_t end = 0;              // the first float past this layer

  int64_t strips() const { return static_cast<int64_t>(offset.size()) - 1; }
  int64_t rows(int64_t s) const { return (offset[s + 1] - offset[s]) / kStripColumns; }
};

inline MadeStripLayout made_strip_layout(int64_t out_units, const int64_t* extent, int64_t begin) {
  MadeStripLayout layout;
  layout.units = out_units;
  const int64_t strips = (out_units + kStripColumns - 1) / kStripColumns;
  layout.offset.assign(strips + 1, begin);
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t last = std::min(out_units, (s + 1) * kStripColumns) - 1;
    layout.offset[s + 1] = layout.offset[s] + extent[last] * kStripColumns;
  }
  layout.bias_offset = layout.offset[strips];
  layout.end = layout.bias_offset + strips * kStripColumns;
  return layout;
}

// weight_t [in, out] (row-major, sorted and masked) and bias [out] (or null) into `buffer` at the layout.
inline void pack_made_strips(const MadeStripLayout& layout, const float* weight_t, const float* bias, float* buffer) {
  const int64_t out = layout.units;
  for (int64_t s = 0; s < layout.strips(); ++s) {
    const int64_t c0 = s * kStripColumns, cols = std::min(kStripColumns, out - c0);
    float* strip = buffer + layout.offset[s];
    for (int64_t k = 0; k < layout.rows(s); ++k) {
      std::memcpy(strip + k * kStripColumns, weight_t + k * out + c0, sizeof(float) * cols);
      std::fill(strip + k * kStripColumns + cols, strip + (k + 1) * kStripColumns, 0.0f);
    }
    float* b = buffer + layout.bias_offset + c0;
    for (int64_t c = 0; c < kStripColumns; ++c) b[c] = (bias && c < cols) ? bias[c0 + c] : 0.0f;
  }
}

#if FL_STRIP_PANELS
namespace made_strip_detail {

// Which of a strip's 16 columns exist: the last strip of a layer may be partial.
struct Columns {
  bool full = true;
  __m256i lo, hi;
  explicit Columns(int64_t cols) : full(cols == kStripColumns) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), lane);
    hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8), lane);
  }
};

// C[kRows x cols] = (first ? bias : C) + A[kRows x K] strip[K x 16]. Loops over the rows are unrolled and
// branch-free so that the 12 accumulators stay in registers (see strip_gemm.h).
template <int kRows>
inline void tile(int64_t K, const float* A, int64_t lda, const float* strip, const float* bias, float* C,
                 int64_t ldc, bool first, const Columns& cols) {
  __m256 lo[kRows], hi[kRows];
  if (first) {
    const __m256 b_lo = _mm256_loadu_ps(bias), b_hi = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      lo[r] = b_lo;
      hi[r] = b_hi;
    }
  } else if (cols.full) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      lo[r] = _mm256_loadu_ps(C + r * ldc);
      hi[r] = _mm256_loadu_ps(C + r * ldc + 8);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      lo[r] = _mm256_maskload_ps(C + r * ldc, cols.lo);
      hi[r] = _mm256_maskload_ps(C + r * ldc + 8, cols.hi);
    }
  }
  strip_detail::fma_rows<kRows>(K, A, lda, strip, lo, hi);
  if (cols.full) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(C + r * ldc, lo[r]);
      _mm256_storeu_ps(C + r * ldc + 8, hi[r]);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      _mm256_maskstore_ps(C + r * ldc, cols.lo, lo[r]);
      _mm256_maskstore_ps(C + r * ldc + 8, cols.hi, hi[r]);
    }
  }
}

inline void rows_tile(int64_t rows, int64_t K, const float* A, int64_t lda, const float* strip, const float* bias,
                      float* C, int64_t ldc, bool first, const Columns& cols) {
  switch (rows) {
    case 6: return tile<6>(K, A, lda, strip, bias, C, ldc, first, cols);
    case 5: return tile<5>(K, A, lda, strip, bias, C, ldc, first, cols);
    case 4: return tile<4>(K, A, lda, strip, bias, C, ldc, first, cols);
    case 3: return tile<3>(K, A, lda, strip, bias, C, ldc, first, cols);
    case 2: return tile<2>(K, A, lda, strip, bias, C, ldc, first, cols);
    default: return tile<1>(K, A, lda, strip, bias, C, ldc, first, cols);
  }
}

}  // namespace made_strip_detail

// z[rows x out] = A[rows x in] W^T + bias for one layer packed at `layout` in `buffer`; strip s reads only the
// first rows(s) inputs. K is taken in chunks that keep a strip's rows in L1.
inline void made_strip_product(int64_t rows, const float* A, int64_t lda, const MadeStripLayout& layout,
                               const float* buffer, float* z, int64_t ldz) {
  for (int64_t s = 0; s < layout.strips(); ++s) {
    const int64_t c0 = s * kStripColumns, K = layout.rows(s);
    const made_strip_detail::Columns cols(std::min(kStripColumns, layout.units - c0));
    const float* strip = buffer + layout.offset[s];
    const float* bias = buffer + layout.bias_offset + c0;
    int64_t k0 = 0;
    do {  // once even when K is 0: the bias alone
      const int64_t kb = std::min(kStripChunk, K - k0);
      for (int64_t m0 = 0; m0 < rows; m0 += 6)
        made_strip_detail::rows_tile(std::min<int64_t>(6, rows - m0), kb, A + m0 * lda + k0, lda,
                                     strip + k0 * kStripColumns, bias, z + m0 * ldz + c0, ldz, k0 == 0, cols);
      k0 += kb;
    } while (k0 < K);
  }
}
#else
inline void made_strip_product(int64_t, const float*, int64_t, const MadeStripLayout&, const float*, float*,
                               int64_t) {}
#endif

}  // namespace fl::FL_ISA
