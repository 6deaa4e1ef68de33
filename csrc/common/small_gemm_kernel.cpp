#include "common/small_gemm_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace fl::FL_ISA {

namespace {

constexpr int64_t kPrefetchRows = 4;

// The register type under Vectorized<T> (the class itself where there is none).
template <typename T>
struct RawRegister {
  using type = at::vec::Vectorized<T>;
};
#if defined(CPU_CAPABILITY_AVX512)
template <> struct RawRegister<float> { using type = __m512; };
template <> struct RawRegister<double> { using type = __m512d; };
#elif defined(CPU_CAPABILITY_AVX2)
template <> struct RawRegister<float> { using type = __m256; };
template <> struct RawRegister<double> { using type = __m256d; };
#endif

// One row of C, columns [j0, j0 + kVecs vectors): the strip stays in registers over the whole K loop. Eight
// vectors keep both FMA pipes busy through their latency; four serve the remainder. B usually streams from L2
// (an LSTM step's recurrent weights): rows a few ahead are prefetched, which the hardware does not do soon
// enough (a 128 KiB GEMV 1.0 -> 0.7 us).
template <int kVecs, typename T>
void row_strip(int64_t K, const T* a, const T* B, int64_t ldb, T* c, bool accumulate) {
  using V = at::vec::Vectorized<T>;
  // Accumulators as raw registers, every loop over them unrolled and branch-free: an array of Vectorized was
  // stored back to the stack at every K step.
  using R = typename RawRegister<T>::type;
  R acc[kVecs];
  if (accumulate) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[v] = V::loadu(c + v * V::size());
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[v] = V(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const V av(a[k]);
    const T* b = B + k * ldb;
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v)  // prefetches never fault, past the end of B included
      __builtin_prefetch(b + kPrefetchRows * ldb + v * V::size(), 0, 3);
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[v] = at::vec::fmadd(av, V::loadu(b + v * V::size()), V(acc[v]));
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) V(acc[v]).store(c + v * V::size());
}

template <typename T>
void rows_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kWide = 8 * V::size(), kNarrow = 4 * V::size();
  // A's rows were often just written by another core (an LSTM step's h_{t-1}): all their cache lines are
  // requested up front, so that the transfers overlap instead of stalling the K loop one by one.
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; k += 64 / int64_t(sizeof(T))) __builtin_prefetch(A + i * lda + k, 0, 3);
  for (int64_t i = 0; i < M; ++i) {
    const T* a = A + i * lda;
    T* c = C + i * ldc;
    int64_t j0 = 0;
    for (; j0 + kWide <= N; j0 += kWide) row_strip<8>(K, a, B + j0, ldb, c + j0, accumulate);
    for (; j0 + kNarrow <= N; j0 += kNarrow) row_strip<4>(K, a, B + j0, ldb, c + j0, accumulate);
    for (; j0 < N; j0 += V::size()) {
      const int64_t w = std::min<int64_t>(V::size(), N - j0);
      V acc = accumulate ? V::loadu(c + j0, w) : V(T(0));
      for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(V(a[k]), V::loadu(B + k * ldb + j0, w), acc);
      acc.store(c + j0, w);
    }
  }
}

}  // namespace

void small_rows_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
  rows_impl(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void small_rows_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                     double* C, int64_t ldc, bool accumulate) {
  rows_impl(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace fl::FL_ISA
