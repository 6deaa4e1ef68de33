// A float GEMM on a right operand packed once into strips of two vectors' width (16 columns on AVX2, 32 on
// AVX-512), for kernel files built with AVX2 or AVX-512 (kStripPanels says whether this build has it). Weights
// that many products reuse (an LSTM's gate panels, a MADE's masked weights, attention's key and value tiles) are
// packed this way once; each product then runs a register tile of 6 (AVX2) or 12 (AVX-512) rows over a strip
// held in L1, where oneDNN's micro-kernel reached 60-80% of the peak on the same blocks. Include only from
// kernel files (compiled once per ISA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define FL_STRIP_PANELS 1
#else
#define FL_STRIP_PANELS 0
#endif

namespace fl::FL_ISA {

constexpr bool kStripPanels = FL_STRIP_PANELS != 0;

#if FL_STRIP_PANELS
namespace strip_detail {
// The few vector operations the tiles need, for the ISA this file is built for.
#if defined(__AVX512F__)
using Vec = __m512;
using LaneMask = __mmask16;
constexpr int64_t kVecFloats = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }  // b where either is NaN
// The first n lanes (n clamped to [0, 16]).
inline LaneMask first_lanes(int64_t n) {
  return static_cast<LaneMask>(n <= 0 ? 0u : n >= kVecFloats ? 0xffffu : (1u << n) - 1u);
}
inline Vec vmaskload(const float* p, LaneMask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void vmaskstore(float* p, LaneMask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
#else
using Vec = __m256;
using LaneMask = __m256i;
constexpr int64_t kVecFloats = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }  // b where either is NaN
inline LaneMask first_lanes(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, kVecFloats))), lane);
}
inline Vec vmaskload(const float* p, LaneMask m) { return _mm256_maskload_ps(p, m); }
inline void vmaskstore(float* p, LaneMask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
#endif
}  // namespace strip_detail
constexpr int64_t kStripColumns = 2 * strip_detail::kVecFloats;
#else
constexpr int64_t kStripColumns = 16;
#endif
// Rows of a register tile: 2 accumulators per row, so 12 of AVX2's 16 registers, or 24 of AVX-512's 32 (with
// twice the rows, each row of the strip loaded from L1 feeds twice the FMAs).
#if defined(__AVX512F__)
constexpr int kTileRows = 12;
constexpr bool kAvx512Strips = true;
#else
constexpr int kTileRows = 6;
constexpr bool kAvx512Strips = false;
#endif

// Calls f(std::integral_constant<int, n>{}) for a run-time n in [1, kMax]: the tiles are templates on their rows.
template <int kMax = kTileRows, typename F>
inline void with_tile_rows(int64_t n, F&& f) {
  if constexpr (kMax == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (n >= kMax) return f(std::integral_constant<int, kMax>{});
    with_tile_rows<kMax - 1>(n, f);
  }
}
// K rows per chunk: a strip chunk (kStripChunk x kStripColumns floats, 16 or 32 KiB) stays in L1 while the row
// tiles pass.
constexpr int64_t kStripChunk = 256;

// B [K x N] (row-major, N a multiple of kStripColumns) as strips, chunk by chunk: chunk c holds rows
// [c * kStripChunk, ...), strip s of it columns [kStripColumns s, kStripColumns (s + 1)), each row of a strip kStripColumns contiguous
// floats. Same size as B.
inline void pack_strips(int64_t K, int64_t N, const float* B, int64_t ldb, float* out) {
  for (int64_t k0 = 0; k0 < K; k0 += kStripChunk) {
    const int64_t kb = std::min(kStripChunk, K - k0);
    float* chunk = out + k0 * N;
    for (int64_t k = 0; k < kb; ++k)
      for (int64_t n0 = 0; n0 < N; n0 += kStripColumns)
        std::memcpy(chunk + n0 * kb + k * kStripColumns, B + (k0 + k) * ldb + n0, sizeof(float) * kStripColumns);
  }
}

#if FL_STRIP_PANELS
namespace strip_detail {

// lo/hi[r] += A[r, 0:K] times B [K x kStripColumns] (rows ldb apart: kStripColumns in a packed strip), r < kRows: the inner loop of
// every strip tile. Always inlined, so that the accumulators stay in registers.
template <int kRows>
__attribute__((always_inline)) inline void fma_rows(int64_t K, const float* A, int64_t lda, const float* B,
                                                    int64_t ldb, Vec (&lo)[kRows], Vec (&hi)[kRows]) {
  for (int64_t k = 0; k < K; ++k) {
    const Vec b_lo = vload(B + k * ldb);
    const Vec b_hi = vload(B + k * ldb + kVecFloats);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const Vec a = vbroadcast(A + r * lda + k);
      lo[r] = vfma(a, b_lo, lo[r]);
      hi[r] = vfma(a, b_hi, hi[r]);
    }
  }
}

// C[kRows x kStripColumns] (+)= A[kRows x K] (rows lda apart) times one strip. Every loop over the rows is unrolled
// and branch-free so that GCC keeps the 12 accumulators in registers.
template <int kRows>
inline void tile(int64_t K, const float* A, int64_t lda, const float* strip, float* C, int64_t ldc, bool accumulate) {
  Vec lo[kRows], hi[kRows];
  if (accumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      lo[r] = vload(C + r * ldc);
      hi[r] = vload(C + r * ldc + kVecFloats);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = vzero();
  }
  fma_rows<kRows>(K, A, lda, strip, kStripColumns, lo, hi);
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    vstore(C + r * ldc, lo[r]);
    vstore(C + r * ldc + kVecFloats, hi[r]);
  }
}

inline void rows_tile(int64_t rows, int64_t K, const float* A, int64_t lda, const float* strip, float* C,
                      int64_t ldc, bool accumulate) {
  with_tile_rows(rows, [&](auto n) { tile<decltype(n)::value>(K, A, lda, strip, C, ldc, accumulate); });
}

// C[1 x kStripColumns kStrips] (+)= a[1 x K] times kStrips consecutive strips (kb rows each, `stride` floats apart): a row of
// a few-row product, 2 kStrips independent accumulators so that the FMA latency is covered. kDescending runs k
// from K - 1 down (see strip_gemm).
template <int kStrips, bool kDescending>
inline void row_strips(int64_t K, const float* a, const float* strips, int64_t stride, float* c, bool accumulate) {
  Vec acc[2 * kStrips];
  if (accumulate) {
#pragma GCC unroll 8
    for (int v = 0; v < 2 * kStrips; ++v) acc[v] = vload(c + kVecFloats * v);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < 2 * kStrips; ++v) acc[v] = vzero();
  }
  constexpr int64_t kAhead = kDescending ? -8 * kStripColumns : 8 * kStripColumns;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t k = kDescending ? K - 1 - i : i;
    const Vec av = vbroadcast(a + k);
#pragma GCC unroll 4
    for (int s = 0; s < kStrips; ++s) {  // B streams from L2 at a few rows per step: prefetched ahead
      const float* row = strips + s * stride + k * kStripColumns;
      _mm_prefetch(reinterpret_cast<const char*>(row + kAhead), _MM_HINT_T0);
      acc[2 * s] = vfma(av, vload(row), acc[2 * s]);
      acc[2 * s + 1] = vfma(av, vload(row + kVecFloats), acc[2 * s + 1]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < 2 * kStrips; ++v) vstore(c + kVecFloats * v, acc[v]);
}

}  // namespace strip_detail

// Calls tile(m0, rows) over [0, M) in tiles of at most kTileRows rows and, where M > kTileRows, at least 3: a
// last tile of 1 or 2 rows (M = 32 on AVX2: 5 x 6 + 2) has too few accumulators to cover the FMA latency, so the
// last kTileRows + 1 or + 2 rows go as two tiles of about half (6 + 1 -> 4 + 3, 6 + 2 -> 4 + 4).
template <typename Tile>
inline void for_row_tiles(int64_t M, Tile tile) {
  constexpr int64_t R = kTileRows;
  const int64_t rest = M % R;
  const int64_t full_end = (M > R && (rest == 1 || rest == 2)) ? M - R - rest : M - rest;
  for (int64_t m0 = 0; m0 < full_end; m0 += R) tile(m0, R);
  const int64_t left = M - full_end;
  if (left > R) {
    const int64_t first = (left + 1) / 2;
    tile(full_end, first);
    tile(full_end + first, left - first);
  } else if (left > 0) {
    tile(full_end, left);
  }
}

// Up to this many rows a product runs row by row over groups of four strips (a tile of so few rows would leave
// the FMA latency uncovered).
constexpr int64_t kStripFewRows = 4;

namespace strip_detail {
template <bool kDescending>
inline void few_rows(int64_t M, int64_t N, int64_t kb, const float* A, int64_t lda, const float* chunk, float* C,
                     int64_t ldc, bool add) {
  const int64_t count = N / kStripColumns, stride = kb * kStripColumns;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    int64_t s = 0;
    for (; s + 4 <= count; s += 4) row_strips<4, kDescending>(kb, a, chunk + s * stride, stride, c + kStripColumns * s, add);
    for (; s + 2 <= count; s += 2) row_strips<2, kDescending>(kb, a, chunk + s * stride, stride, c + kStripColumns * s, add);
    for (; s < count; ++s) row_strips<1, kDescending>(kb, a, chunk + s * stride, stride, c + kStripColumns * s, add);
  }
}
}  // namespace strip_detail

// C[M x N] (+)= A[M x K] B, B packed by pack_strips (N a multiple of kStripColumns).
// `descending` (honoured for at most kStripFewRows rows) runs the inner dimension from its end: a caller that
// streams the same strips on every call (an LSTM's recurrent weights, larger than L1) and alternates the
// direction finds the rows it read last, still in L1, first.
inline void strip_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* strips, float* C,
                       int64_t ldc, bool accumulate, bool descending = false) {
  if (M <= kStripFewRows && descending) {
    const int64_t chunks = (K + kStripChunk - 1) / kStripChunk;
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t k0 = c * kStripChunk, kb = std::min(kStripChunk, K - k0);
      strip_detail::few_rows<true>(M, N, kb, A + k0, lda, strips + k0 * N, C, ldc, accumulate || c < chunks - 1);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kStripChunk) {
    const int64_t kb = std::min(kStripChunk, K - k0);
    const float* chunk = strips + k0 * N;
    const bool add = accumulate || k0 > 0;
    if (M <= kStripFewRows) {
      strip_detail::few_rows<false>(M, N, kb, A + k0, lda, chunk, C, ldc, add);
      continue;
    }
    for (int64_t n0 = 0; n0 < N; n0 += kStripColumns)
      for_row_tiles(M, [&](int64_t m0, int64_t rows) {
        strip_detail::rows_tile(rows, kb, A + m0 * lda + k0, lda, chunk + n0 * kb, C + m0 * ldc + n0, ldc, add);
      });
  }
}
#else
// Builds without the strip kernel never pack strips (kStripPanels is false); defined for the type checker only.
inline void strip_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, bool,
                       bool = false) {}
#endif

}  // namespace fl::FL_ISA
