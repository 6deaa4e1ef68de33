#include "common/small_gemm_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace fl::FL_ISA {

namespace {

template <typename T>
void rows_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool accumulate) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kVecs = 4;  // a strip of 4 vectors of C stays in registers over the whole K loop
  constexpr int64_t kStrip = kVecs * V::size();
  for (int64_t i = 0; i < M; ++i) {
    const T* a = A + i * lda;
    T* c = C + i * ldc;
    int64_t j0 = 0;
    for (; j0 + kStrip <= N; j0 += kStrip) {
      V c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0));
      if (accumulate) {
        c0 = V::loadu(c + j0);
        c1 = V::loadu(c + j0 + V::size());
        c2 = V::loadu(c + j0 + 2 * V::size());
        c3 = V::loadu(c + j0 + 3 * V::size());
      }
      for (int64_t k = 0; k < K; ++k) {
        const V av(a[k]);
        const T* b = B + k * ldb + j0;
        c0 = at::vec::fmadd(av, V::loadu(b), c0);
        c1 = at::vec::fmadd(av, V::loadu(b + V::size()), c1);
        c2 = at::vec::fmadd(av, V::loadu(b + 2 * V::size()), c2);
        c3 = at::vec::fmadd(av, V::loadu(b + 3 * V::size()), c3);
      }
      c0.store(c + j0);
      c1.store(c + j0 + V::size());
      c2.store(c + j0 + 2 * V::size());
      c3.store(c + j0 + 3 * V::size());
    }
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
