// The GEMM engine: every matrix product in the kernels goes through these functions.
//   C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]
// All matrices are row-major with explicit leading dimensions; no transposes (callers lay data out so that
// none are needed, or copy with transpose_copy). fp32 uses oneDNN's JIT micro-kernel through torch
// (at::native::cpublas::brgemm) when it is available and a portable blocked loop otherwise, and on AVX2 CPUs the
// BLAS that torch exports (MKL) for gemm_parallel; fp64 uses that BLAS where present (the portable loop
// otherwise); bf16 multiplies in bf16 and accumulates in fp32, with B packed beforehand by pack_b_bf16.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fl {

using bf16 = c10::BFloat16;

// Single-threaded; safe to call from inside a parallel region.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
          double* C, int64_t ldc, bool accumulate);

// bf16 x bf16 -> fp32. B_packed comes from pack_b_bf16 over the same K x N matrix.
int64_t packed_b_bf16_size(int64_t K, int64_t N);
void pack_b_bf16(int64_t K, int64_t N, const bf16* B, int64_t ldb, bf16* B_packed);
// Multiplies by columns [n0, n0 + N) of a packed B whose full width is N_packed.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_packed,
               int64_t N_packed, int64_t n0, float* C, int64_t ldc, bool accumulate);

// Multi-threaded versions for large bf16 products: B [K x N] packed with its row pairs shared among threads, and
// C[M x N] = A B (B packed, full width N) over output tiles.
void pack_b_bf16_parallel(int64_t K, int64_t N, const bf16* B, bf16* B_packed);
void gemm_parallel_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_packed, float* C,
                        int64_t ldc);

// Multi-threaded over output tiles; for the large products (input projections, weight gradients).
void gemm_parallel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate);
void gemm_parallel(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                   int64_t ldb, double* C, int64_t ldc, bool accumulate);

// C = A B + bias (bias[N] added to every row; C's prior contents ignored), multi-threaded like gemm_parallel.
void gemm_parallel_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        const float* bias, float* C, int64_t ldc);
void gemm_parallel_bias(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                        int64_t ldb, const double* bias, double* C, int64_t ldc);

// "brgemm", "brgemm+blas" (products shared among threads on the BLAS) or "portable": the fp32 backends.
const char* gemm_backend();
// Whether bf16 products run on the micro-kernel: false on CPUs without native bf16 dot products (AVX512-BF16),
// where gemm_bf16 falls back to a scalar loop and bf16 layers are better computed in float32.
bool gemm_bf16_native();

// dst[c * ld_dst + r] = src[r * ld_src + c] for a rows x cols source.
template <typename T>
void transpose_copy(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 32;  // tiles keep both sides in cache lines
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
      const int64_t c1 = c0 + kTile < cols ? c0 + kTile : cols;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
}

}  // namespace fl
