// A float GEMM on a right operand packed once into 16-column strips, for kernel files built with AVX2 but not
// AVX-512 (kStripPanels says whether this build has it). Weights that many products reuse (an LSTM's gate
// panels) are packed this way when the layer starts; each product then runs a 6 x 16 register tile over a
// strip held in L1, where oneDNN's AVX2 micro-kernel reached 70-80% of the peak on the same blocks. Include only
// from kernel files (compiled once per ISA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define FL_STRIP_PANELS 1
#else
#define FL_STRIP_PANELS 0
#endif

namespace fl::FL_ISA {

constexpr bool kStripPanels = FL_STRIP_PANELS != 0;
constexpr int64_t kStripColumns = 16;
// K rows per chunk: a strip chunk (kStripChunk x 16 floats, 16 KiB) stays in L1 while the row tiles pass.
constexpr int64_t kStripChunk = 256;

// B [K x N] (row-major, N a multiple of 16) as strips, chunk by chunk: chunk c holds rows [c * kStripChunk, ...),
// strip s of it columns [16 s, 16 s + 16), each row of a strip 16 contiguous floats. Same size as B.
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

// lo/hi[r] += A[r, 0:K] times B [K x 16] (rows ldb apart: 16 in a packed strip), r < kRows: the inner loop of
// every strip tile. Always inlined, so that the accumulators stay in registers.
template <int kRows>
__attribute__((always_inline)) inline void fma_rows(int64_t K, const float* A, int64_t lda, const float* B,
                                                    int64_t ldb, __m256 (&lo)[kRows], __m256 (&hi)[kRows]) {
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b_lo = _mm256_loadu_ps(B + k * ldb);
    const __m256 b_hi = _mm256_loadu_ps(B + k * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      lo[r] = _mm256_fmadd_ps(a, b_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(a, b_hi, hi[r]);
    }
  }
}

// C[kRows x 16] (+)= A[kRows x K] (rows lda apart) times one strip [K x 16]. Every loop over the rows is unrolled
// and branch-free so that GCC keeps the 12 accumulators in registers.
template <int kRows>
inline void tile(int64_t K, const float* A, int64_t lda, const float* strip, float* C, int64_t ldc, bool accumulate) {
  __m256 lo[kRows], hi[kRows];
  if (accumulate) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      lo[r] = _mm256_loadu_ps(C + r * ldc);
      hi[r] = _mm256_loadu_ps(C + r * ldc + 8);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  }
  fma_rows<kRows>(K, A, lda, strip, kStripColumns, lo, hi);
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(C + r * ldc, lo[r]);
    _mm256_storeu_ps(C + r * ldc + 8, hi[r]);
  }
}

inline void rows_tile(int64_t rows, int64_t K, const float* A, int64_t lda, const float* strip, float* C,
                      int64_t ldc, bool accumulate) {
  switch (rows) {
    case 6: return tile<6>(K, A, lda, strip, C, ldc, accumulate);
    case 5: return tile<5>(K, A, lda, strip, C, ldc, accumulate);
    case 4: return tile<4>(K, A, lda, strip, C, ldc, accumulate);
    case 3: return tile<3>(K, A, lda, strip, C, ldc, accumulate);
    case 2: return tile<2>(K, A, lda, strip, C, ldc, accumulate);
    default: return tile<1>(K, A, lda, strip, C, ldc, accumulate);
  }
}

// C[1 x 16 kStrips] (+)= a[1 x K] times kStrips consecutive strips (kb rows each, `stride` floats apart): a row of
// a few-row product, 2 kStrips independent accumulators so that the FMA latency is covered.
template <int kStrips>
inline void row_strips(int64_t K, const float* a, const float* strips, int64_t stride, float* c, bool accumulate) {
  __m256 acc[2 * kStrips];
  if (accumulate) {
#pragma GCC unroll 8
    for (int v = 0; v < 2 * kStrips; ++v) acc[v] = _mm256_loadu_ps(c + 8 * v);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < 2 * kStrips; ++v) acc[v] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 av = _mm256_broadcast_ss(a + k);
#pragma GCC unroll 4
    for (int s = 0; s < kStrips; ++s) {  // B streams from L2 at a few rows per step: prefetched ahead
      const float* row = strips + s * stride + k * kStripColumns;
      _mm_prefetch(reinterpret_cast<const char*>(row + 8 * kStripColumns), _MM_HINT_T0);
      acc[2 * s] = _mm256_fmadd_ps(av, _mm256_loadu_ps(row), acc[2 * s]);
      acc[2 * s + 1] = _mm256_fmadd_ps(av, _mm256_loadu_ps(row + 8), acc[2 * s + 1]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < 2 * kStrips; ++v) _mm256_storeu_ps(c + 8 * v, acc[v]);
}

}  // namespace strip_detail

// Calls tile(m0, rows) over [0, M) in tiles of at most 6 rows and, where M > 6, at least 3: a last tile of 1 or 2
// rows (M = 32: 5 x 6 + 2) has too few accumulators to cover the FMA latency, so the last 7 or 8 rows go as
// 4 + 3 or 4 + 4.
template <typename Tile>
inline void for_row_tiles(int64_t M, Tile tile) {
  const int64_t rest = M % 6;
  const int64_t sixes_end = (M > 6 && (rest == 1 || rest == 2)) ? M - 6 - rest : M - rest;
  for (int64_t m0 = 0; m0 < sixes_end; m0 += 6) tile(m0, int64_t{6});
  const int64_t left = M - sixes_end;
  if (left > 6) {
    tile(sixes_end, int64_t{4});
    tile(sixes_end + 4, left - 4);
  } else if (left > 0) {
    tile(sixes_end, left);
  }
}

// Up to this many rows a product runs row by row over groups of four strips (a tile of so few rows would leave
// the FMA latency uncovered).
constexpr int64_t kStripFewRows = 4;

// C[M x N] (+)= A[M x K] B, B packed by pack_strips (N a multiple of 16).
inline void strip_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* strips, float* C,
                       int64_t ldc, bool accumulate) {
  for (int64_t k0 = 0; k0 < K; k0 += kStripChunk) {
    const int64_t kb = std::min(kStripChunk, K - k0);
    const float* chunk = strips + k0 * N;
    const bool add = accumulate || k0 > 0;
    if (M <= kStripFewRows) {
      const int64_t count = N / kStripColumns, stride = kb * kStripColumns;
      for (int64_t m = 0; m < M; ++m) {
        const float* a = A + m * lda + k0;
        float* c = C + m * ldc;
        int64_t s = 0;
        for (; s + 4 <= count; s += 4) strip_detail::row_strips<4>(kb, a, chunk + s * stride, stride, c + 16 * s, add);
        for (; s + 2 <= count; s += 2) strip_detail::row_strips<2>(kb, a, chunk + s * stride, stride, c + 16 * s, add);
        for (; s < count; ++s) strip_detail::row_strips<1>(kb, a, chunk + s * stride, stride, c + 16 * s, add);
      }
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
inline void strip_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, bool) {}
#endif

}  // namespace fl::FL_ISA
