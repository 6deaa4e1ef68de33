// Entry points of the ISA-built transposing copy (transpose_kernel.h) for files that are compiled once, such as
// the op layer: call them through FL_DISPATCH_ISA.
#pragma once

#include "common/isa.h"

#include <cstdint>

#define FL_TRANSPOSE_DECLS                                                                                    \
  void transposed_copy(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst,              \
                       int64_t ld_dst);                                                                       \
  void transposed_copy(int64_t rows, int64_t cols, const double* src, int64_t ld_src, double* dst,            \
                       int64_t ld_dst);

FL_DECLARE_FOR_EACH_ISA(FL_TRANSPOSE_DECLS)
