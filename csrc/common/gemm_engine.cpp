// Backends of the GEMM engine (interface and contract in gemm.h). This is the one file that touches torch's
// internal micro-kernel API (at::native::cpublas), so a torch upgrade that changes it breaks only here.
#include "common/gemm.h"

#include "common/isa.h"
#include "common/parallel.h"
#include "common/small_gemm_kernel.h"
#include "common/workspace.h"

#include <ATen/Config.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The Fortran BLAS that libtorch_cpu exports on x86 builds (MKL); weak references, null where torch was built
// without it (the engine's other backends then serve).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));

namespace fl {

namespace {

// Tile sizes for the micro-kernel: measured by benchmarks/bench_gemm.py, these reach the FMA peak on the
// block shapes the kernels use while keeping a B panel (kTileK x kTileN) in L1/L2.
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 128;
constexpr int64_t kTileK = 256;
// Rows of B taken at a time by the single-thread product: a [kPanelK x kTileN] panel (128 KiB) stays in L2 while
// every row block of A passes over it (a whole [K x kTileN] panel did not fit L2 for K in the thousands).
constexpr int64_t kPanelK = 256;

template <typename T>
void portable_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      const T* __restrict b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

bool env_forces_portable() {
  const char* env = std::getenv("FUSEDLAYERS_GEMM");
  return env != nullptr && std::strcmp(env, "portable") == 0;
}

// Checks once that the micro-kernel exists and gives right answers on this machine.
bool probe_brgemm_f32() {
#if AT_MKLDNN_ENABLED()
  if (env_forces_portable()) return false;
  try {
    const float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};
    float c[4] = {0, 0, 0, 0};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
    return c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50;
  } catch (...) {
    return false;
  }
#else
  return false;
#endif
}

bool probe_brgemm_bf16() {
#if AT_MKLDNN_ENABLED()
  // B is packed by our own pack_b_bf16 (oneDNN's packer, cpublas::pack, exists only on some CPUs).
  if (env_forces_portable()) return false;
  try {
    const bf16 a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};
    bf16 packed[4];
    pack_b_bf16(2, 2, b, 2, packed);
    float c[4] = {0, 0, 0, 0};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, packed, c, true);
    return c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50;
  } catch (...) {
    return false;
  }
#else
  return false;
#endif
}

bool use_brgemm_f32() {
  static const bool ok = probe_brgemm_f32();
  return ok;
}

// Whether the exported BLAS can take this product: present, not refused by FUSEDLAYERS_GEMM, sizes within its
// 32-bit ints, leading dimensions at least the row lengths (BLAS refuses less, e.g. a zero-stride view).
bool blas_fits(bool present, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  const bool strides_ok = lda >= std::max<int64_t>(1, K) && ldb >= std::max<int64_t>(1, N) &&
                          ldc >= std::max<int64_t>(1, N);
  return present && K > 0 && strides_ok && std::max({M, N, K, lda, ldb, ldc}) <= kMax;
}

// float64 products go to the BLAS (torch's own float64 layers use it: the portable loop was 4x slower than
// torch's float64 LSTM). float32 products go to it on AVX2 CPUs, where oneDNN's AVX2 micro-kernel in our tiles
// ran about 6% behind it, and on Intel's AVX-512 CPUs (a Xeon with AMX: 2048^3 0.88x torch's matmul on our
// tiles; LSTM, MultiheadAttention and transformer rows 2-5% faster on MKL in an A/B); not on AMD's AVX-512
// (Zen 5: our tiles were up to 2x torch's matmul).
bool use_blas(const double*, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  static const bool present = dgemm_ != nullptr && !env_forces_portable();
  return blas_fits(present, M, N, K, lda, ldb, ldc);
}

bool use_blas(const float*, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  static const bool present = [] {
    const char* env = std::getenv("FUSEDLAYERS_GEMM");
    const bool brgemm_forced = env != nullptr && std::strcmp(env, "brgemm") == 0;
    const bool blas_forced = env != nullptr && std::strcmp(env, "blas") == 0;
    return sgemm_ != nullptr && !env_forces_portable() && !brgemm_forced &&
           (blas_forced || active_isa() == Isa::avx2 || (active_isa() == Isa::avx512 && cpu_is_intel()));
  }();
  return blas_fits(present, M, N, K, lda, ldb, ldc);
}

// Row-major C = A B is column-major C^T = B^T A^T. Outside a parallel region MKL uses torch's thread count;
// inside one, the calling thread.
void blas_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  sgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

void blas_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
               double* C, int64_t ldc, bool accumulate) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const double one = 1.0, beta = accumulate ? 1.0 : 0.0;
  dgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

bool use_brgemm_bf16() {
  static const bool ok = probe_brgemm_bf16();
  return ok;
}

// C[M x nb] (+)= A[M x kcb] panel[kcb x nb] on oneDNN's micro-kernel, in tiles of kTileM rows and kTileK of depth:
// the loop that gemm runs over each panel of B, whether it copied the panel or not. bias (optional, nb values) is
// added to each block of rows as soon as its products are done, while the block is in L1: copying the bias into C
// first cost a pass over C from memory, about 5% of a projection's time.
void panel_rows_brgemm(int64_t M, int64_t nb, int64_t kcb, const float* A, int64_t lda, const float* panel,
                       int64_t ld_panel, float* C, int64_t ldc, bool accumulate, const float* bias = nullptr) {
  for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
    const int64_t mb = std::min(kTileM, M - m0);
    for (int64_t k0 = 0; k0 < kcb; k0 += kTileK) {
      const int64_t kb = std::min(kTileK, kcb - k0);
      at::native::cpublas::brgemm(mb, nb, kb, lda, ld_panel, ldc, accumulate || k0 > 0, A + m0 * lda + k0,
                                  panel + k0 * ld_panel, C + m0 * ldc, false);
    }
    if (bias != nullptr)
      for (int64_t r = m0; r < m0 + mb; ++r) {
        float* row = C + r * ldc;
        for (int64_t c = 0; c < nb; ++c) row[c] += bias[c];
      }
  }
}

// gemm's brgemm loop over panels of B (kPanelK rows, kTileN columns), the bias added after the last panel.
void brgemm_panels(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate, const float* bias) {
  for (int64_t kc = 0; kc < K; kc += kPanelK) {
    const int64_t kcb = std::min(kPanelK, K - kc);
    const bool last_panel = kc + kcb >= K;
    for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
      const int64_t nb = std::min(kTileN, N - n0);
      // A panel of B is copied to a contiguous one when several row blocks of A will reuse it, or when its rows
      // are a multiple of 2 KiB apart: they then share a few L1 sets and evict each other (1024^3 on one Zen 3
      // core ran at 37 GFLOP/s).
      const float* panel = B + kc * ldb + n0;
      int64_t ld_panel = ldb;
      if (ldb != nb && (M > kTileM || (ldb * int64_t(sizeof(float))) % 2048 == 0)) {
        float* packed = workspace<float>(WorkspaceSlot::gemm_b, kcb * nb);
        for (int64_t k = 0; k < kcb; ++k) std::memcpy(packed + k * nb, panel + k * ldb, sizeof(float) * nb);
        panel = packed;
        ld_panel = nb;
      }
      panel_rows_brgemm(M, nb, kcb, A + kc, lda, panel, ld_panel, C + n0, ldc, accumulate || kc > 0,
                        last_panel && bias != nullptr ? bias + n0 : nullptr);
    }
  }
}

}  // namespace

const char* gemm_backend() {
  if (!use_brgemm_f32()) return "portable";
  return use_blas(static_cast<const float*>(nullptr), 1, 1, 1, 1, 1, 1) ? "brgemm+blas" : "brgemm";
}

bool gemm_bf16_native() { return use_brgemm_bf16() && cpu_has_avx512_bf16(); }

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (M <= kSmallGemmRows) {
    FL_DISPATCH_ISA(small_rows_gemm, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  if (!use_brgemm_f32()) return portable_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  brgemm_panels(M, N, K, A, lda, B, ldb, C, ldc, accumulate, nullptr);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
          double* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (M <= kSmallGemmRows && K > 0) {
    FL_DISPATCH_ISA(small_rows_gemm, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  if (use_blas(A, M, N, K, lda, ldb, ldc)) return blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  portable_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// Packed layout: pairs of consecutive K rows interleaved, [ceil(K/2)][N][2], odd K padded with a zero row.
int64_t packed_b_bf16_size(int64_t K, int64_t N) { return ((K + 1) / 2) * N * 2; }

void pack_b_bf16(int64_t K, int64_t N, const bf16* B, int64_t ldb, bf16* B_packed) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const bf16* row0 = B + (2 * p) * ldb;
    const bool has_row1 = 2 * p + 1 < K;
    const bf16* row1 = B + (2 * p + 1) * ldb;
    bf16* out = B_packed + p * N * 2;
    // On the bits, each pair as one 32-bit word (row 0 in the low half on little-endian x86 and ARM): a loop
    // that the compiler vectorises, where one over bf16 objects stayed scalar.
    static_assert(sizeof(bf16) == sizeof(uint16_t));
    const auto* bits0 = reinterpret_cast<const uint16_t*>(row0);
    const auto* bits1 = reinterpret_cast<const uint16_t*>(row1);
    if (has_row1) {
      for (int64_t j = 0; j < N; ++j) {
        const uint32_t word = uint32_t(bits0[j]) | (uint32_t(bits1[j]) << 16);
        std::memcpy(out + 2 * j, &word, sizeof(word));
      }
    } else {
      for (int64_t j = 0; j < N; ++j) {
        const uint32_t word = bits0[j];
        std::memcpy(out + 2 * j, &word, sizeof(word));
      }
    }
  }
}

void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_packed,
               int64_t N_packed, int64_t n0, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  const int64_t K_even = K & ~int64_t(1);
  if (use_brgemm_bf16() && K_even > 0) {
    for (int64_t j0 = 0; j0 < N; j0 += kTileN) {
      const int64_t nb = std::min(kTileN, N - j0);
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t mb = std::min(kTileM, M - m0);
        for (int64_t k0 = 0; k0 < K_even; k0 += kTileK) {
          const int64_t kb = std::min(kTileK, K_even - k0);
          at::native::cpublas::brgemm(mb, nb, kb, lda, N_packed, ldc, accumulate || k0 > 0,
                                      A + m0 * lda + k0, B_packed + (k0 / 2) * N_packed * 2 + (n0 + j0) * 2,
                                      C + m0 * ldc + j0, true);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < M; ++i)
      if (!accumulate) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
  }
  // The portable path, and the odd last row of K, read the packed pairs directly.
  const int64_t k_start = (use_brgemm_bf16() && K_even > 0) ? K_even : 0;
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    for (int64_t k = k_start; k < K; ++k) {
      const float a = static_cast<float>(A[i * lda + k]);
      const bf16* b = B_packed + (k / 2) * N_packed * 2 + (k % 2);
      for (int64_t j = 0; j < N; ++j) c[j] += a * static_cast<float>(b[(n0 + j) * 2]);
    }
  }
}

void pack_b_bf16_parallel(int64_t K, int64_t N, const bf16* B, bf16* B_packed) {
  constexpr int64_t kRows = 64;  // even: each chunk starts on a row pair
  parallel_for((K + kRows - 1) / kRows, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * kRows;
      pack_b_bf16(std::min(kRows, K - k0), N, B + k0 * N, N, B_packed + k0 * N);
    }
  });
}

void gemm_parallel_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_packed, float* C,
                        int64_t ldc) {
  constexpr int64_t kRows = 128, kCols = 256;
  const int64_t tiles_m = (M + kRows - 1) / kRows, tiles_n = (N + kCols - 1) / kCols;
  parallel_for(tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t % tiles_m) * kRows, n0 = (t / tiles_m) * kCols;
      gemm_bf16(std::min(kRows, M - m0), std::min(kCols, N - n0), K, A + m0 * lda, lda, B_packed, N, n0,
                C + m0 * ldc + n0, ldc, false);
    }
  });
}

namespace {

// A whole B is copied once into column chunks of kTileN, each a contiguous [K x width] block, when the tiles of a
// parallel product would otherwise each copy the same panels (gemm copies a panel per tile: for a 4096 x 1536 x
// 512 projection, 48 MiB of copies for a 3 MiB B, 5% of its time). Up to this size, a few MiB of L3.
constexpr int64_t kWholeBMaxFloats = int64_t(4) << 20;

void pack_b_chunks(int64_t K, int64_t N, const float* B, int64_t ldb, float* out) {
  parallel_for((N + kTileN - 1) / kTileN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n0 = chunk * kTileN, nb = std::min(kTileN, N - n0);
      for (int64_t k = 0; k < K; ++k) std::memcpy(out + n0 * K + k * nb, B + k * ldb + n0, sizeof(float) * nb);
    }
  });
}

// gemm's brgemm loop on B in the layout of pack_b_chunks (B_chunks points at the chunk of column 0 of this C
// block, which starts on a chunk boundary).
void gemm_packed_b(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B_chunks, float* C,
                   int64_t ldc, bool accumulate, const float* bias) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
    const int64_t nb = std::min(kTileN, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      const int64_t mb = std::min(kTileM, M - m0);
      for (int64_t kc = 0; kc < K; kc += kPanelK) {
        const int64_t kcb = std::min(kPanelK, K - kc);
        panel_rows_brgemm(mb, nb, kcb, A + m0 * lda + kc, lda, B_chunks + n0 * K + kc * nb, nb, C + m0 * ldc + n0,
                          ldc, accumulate || kc > 0, kc + kcb >= K && bias != nullptr ? bias + n0 : nullptr);
      }
    }
  }
}

template <typename T>
void tiled_parallel(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate, const T* bias = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (use_blas(A, M, N, K, lda, ldb, ldc) && !at::in_parallel_region()) {
    if (bias != nullptr)
      for (int64_t r = 0; r < M; ++r) std::copy(bias, bias + N, C + r * ldc);
    return blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate || bias != nullptr);
  }
  // Tiles big enough to keep the micro-kernel at full speed, and enough of them to share among threads: large
  // tiles are halved (down to one micro-kernel tile) until every thread has at least two.
  int64_t tile_m = 4 * kTileM, tile_n = 4 * kTileN;
  const int64_t wanted = 2 * static_cast<int64_t>(num_threads());
  auto count = [&] { return ((M + tile_m - 1) / tile_m) * ((N + tile_n - 1) / tile_n); };
  while (count() < wanted && (tile_m > kTileM || tile_n > kTileN)) {
    if (tile_m >= tile_n && tile_m > kTileM) tile_m /= 2;
    else if (tile_n > kTileN) tile_n /= 2;
    else tile_m /= 2;
  }
  const int64_t tiles_m = (M + tile_m - 1) / tile_m, tiles_n = (N + tile_n - 1) / tile_n;
  const int64_t flops_per_tile = 2 * std::min(tile_m, M) * std::min(tile_n, N) * std::max<int64_t>(K, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(flops_per_tile, 1));
  // Tiles start on chunk boundaries: tile_n is kTileN times a power of two.
  const float* whole_b = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (tiles_m >= 8 && K > 0 && M > kSmallGemmRows && K * N <= kWholeBMaxFloats && use_brgemm_f32()) {
      float* packed = workspace<float>(WorkspaceSlot::gemm_b_whole, K * N);
      pack_b_chunks(K, N, B, ldb, packed);
      whole_b = packed;
    }
  }
  // Tiles taken in turn (parallel_for_dynamic): every tile computes its block of C whole, so the result does not
  // depend on which thread takes it.
  parallel_for_dynamic(tiles_m * tiles_n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // Column-major order over tiles: consecutive tiles share the same B panel.
      const int64_t tm = t % tiles_m, tn = t / tiles_m;
      const int64_t m0 = tm * tile_m, n0 = tn * tile_n, rows = std::min(tile_m, M - m0);
      const int64_t cols = std::min(tile_n, N - n0);
      if constexpr (std::is_same_v<T, float>) {
        // On the micro-kernel the bias is added to each block of C as its products finish (K > 0: gemm's
        // loop runs at least one panel).
        if (whole_b != nullptr) {
          gemm_packed_b(rows, cols, K, A + m0 * lda, lda, whole_b + n0 * K, C + m0 * ldc + n0, ldc, accumulate,
                        bias != nullptr ? bias + n0 : nullptr);
          continue;
        }
        if (bias != nullptr && K > 0 && rows > kSmallGemmRows && use_brgemm_f32()) {
          brgemm_panels(rows, cols, K, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate,
                        bias + n0);
          continue;
        }
      }
      if (bias != nullptr)  // per tile, while it is in cache (a pass over all of C first cost 10% of a linear)
        for (int64_t r = 0; r < rows; ++r) std::copy(bias + n0, bias + n0 + cols, C + (m0 + r) * ldc + n0);
      gemm(rows, cols, K, A + m0 * lda, lda, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate || bias != nullptr);
    }
  });
}

}  // namespace

void gemm_parallel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate) {
  tiled_parallel(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_parallel(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                   int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  tiled_parallel(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_parallel_bias(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, const float* bias, float* C, int64_t ldc) {
  tiled_parallel(M, N, K, A, lda, B, ldb, C, ldc, false, bias);
}

void gemm_parallel_bias(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                        int64_t ldb, const double* bias, double* C, int64_t ldc) {
  tiled_parallel(M, N, K, A, lda, B, ldb, C, ldc, false, bias);
}

}  // namespace fl
