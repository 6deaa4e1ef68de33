// The GEMM engine's path for products with very few rows (M <= kSmallGemmRows), such as an LSTM step at batch 1
// or attention decoding: the micro-kernel's per-call cost dominates there, and a row of C fits in registers
// while B is streamed once per row. Built per ISA (csrc/common/small_gemm_kernel.cpp).
#pragma once

#include "common/isa.h"

#include <cstdint>

namespace fl {
constexpr int64_t kSmallGemmRows = 4;
}

#define FL_SMALL_GEMM_DECLS                                                                                   \
  void small_rows_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,         \
                       int64_t ldb, float* C, int64_t ldc, bool accumulate);                                 \
  void small_rows_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,       \
                       int64_t ldb, double* C, int64_t ldc, bool accumulate);

FL_DECLARE_FOR_EACH_ISA(FL_SMALL_GEMM_DECLS)
