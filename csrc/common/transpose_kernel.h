// A transposing copy for the kernel files (compiled once per ISA: include it only from them). With AVX, float
// matrices move in 8 x 8 blocks through registers; the scalar loop of gemm.h's transpose_copy stores one
// element at a time to a strided address, which cost about a tenth of the attention backward.
#pragma once

#include "common/gemm.h"

#include <cstdint>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace fl::FL_ISA {

#if defined(__AVX__)
// dst[c * ld_dst + r] = src[r * ld_src + c] for one 8 x 8 block.
inline void transpose_block_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 4; ++i) {  // interleave row pairs: (r0 r1), (r2 r3), ...
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // then pairs of pairs: four rows' elements side by side in each 128-bit lane
    const int a = 4 * i;
    r[a] = _mm256_shuffle_ps(t[a], t[a + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[a + 1] = _mm256_shuffle_ps(t[a], t[a + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[a + 2] = _mm256_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[a + 3] = _mm256_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // and the lanes of rows 0-3 and 4-7 joined: columns 0-3, then 4-7
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for a rows x cols source (gemm.h's transpose_copy, faster).
template <typename T>
void fast_transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t full_rows = rows / 8 * 8, full_cols = cols / 8 * 8;
    for (int64_t r0 = 0; r0 < full_rows; r0 += 8) {
      for (int64_t c0 = 0; c0 < full_cols; c0 += 8)
        transpose_block_8x8(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
      for (int64_t c = full_cols; c < cols; ++c)
        for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
    if (full_rows < rows) transpose_copy(rows - full_rows, cols, src + full_rows * ld_src, ld_src,
                                         dst + full_rows, ld_dst);
    return;
  }
#endif
  transpose_copy(rows, cols, src, ld_src, dst, ld_dst);
}

}  // namespace fl::FL_ISA
