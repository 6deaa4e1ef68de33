// The transposing copy of transpose_kernel.h as a function per ISA (see transpose_dispatch.h).
#include "common/transpose_dispatch.h"
#include "common/transpose_kernel.h"

namespace fl::FL_ISA {

void transposed_copy(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  fast_transpose(rows, cols, src, ld_src, dst, ld_dst);
}

void transposed_copy(int64_t rows, int64_t cols, const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  fast_transpose(rows, cols, src, ld_src, dst, ld_dst);
}

}  // namespace fl::FL_ISA
