#include "common/peak.h"

#include "common/isa.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(FL_HAVE_X86_ISAS)
#include <immintrin.h>
#endif

namespace fl {

namespace {

constexpr int kAccumulators = 12;  // more than latency x pipes (4 x 2) so the loop is throughput bound
constexpr int64_t kInnerIters = 1 << 16;

#if defined(FL_HAVE_X86_ISAS)
__attribute__((target("avx512f"))) double fma_avx512(int64_t iters) {
  __m512 acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm512_set1_ps(1.0f + k * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
  float sink = 0;
  for (int k = 0; k < kAccumulators; ++k) sink += _mm512_reduce_add_ps(acc[k]);
  return sink;
}

__attribute__((target("avx2,fma"))) double fma_avx2(int64_t iters) {
  __m256 acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm256_set1_ps(1.0f + k * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
  float out[8], sink = 0;
  for (int k = 0; k < kAccumulators; ++k) {
    _mm256_storeu_ps(out, acc[k]);
    for (float v : out) sink += v;
  }
  return sink;
}

__attribute__((target("avx512f,avx512bf16"))) double dpbf16_avx512(int64_t iters) {
  __m512 acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm512_set1_ps(1.0f + k * 1e-3f);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < kAccumulators; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
  float sink = 0;
  for (int k = 0; k < kAccumulators; ++k) sink += _mm512_reduce_add_ps(acc[k]);
  return sink;
}
#endif

double scalar_fma(int64_t iters) {
  float acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) acc[k] = 1.0f + k * 1e-3f;
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < kAccumulators; ++k) acc[k] = acc[k] * 0.999999f + 1e-7f;
  float sink = 0;
  for (float v : acc) sink += v;
  return sink;
}

}  // namespace

double measure_peak_gflops(const char* kind, int threads, double seconds) {
  double (*loop)(int64_t) = scalar_fma;
  double flops_per_iter = 2.0 * kAccumulators;
  const bool bf16 = std::strcmp(kind, "bf16") == 0;
  if (!bf16 && std::strcmp(kind, "fp32") != 0) throw std::invalid_argument("kind must be 'fp32' or 'bf16'");
#if defined(FL_HAVE_X86_ISAS)
  const Isa isa = best_supported_isa();
  if (bf16) {
    if (isa != Isa::avx512) throw std::runtime_error("this CPU has no bf16 dot-product instructions");
    loop = dpbf16_avx512;
    flops_per_iter = 2.0 * 32 * kAccumulators;
  } else if (isa == Isa::avx512) {
    loop = fma_avx512;
    flops_per_iter = 2.0 * 16 * kAccumulators;
  } else if (isa == Isa::avx2) {
    loop = fma_avx2;
    flops_per_iter = 2.0 * 8 * kAccumulators;
  }
#else
  if (bf16) throw std::runtime_error("bf16 peak is only measured on x86-64");
#endif
  if (threads < 1) threads = 1;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> rates(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      const auto start = std::chrono::steady_clock::now();
      int64_t done = 0;
      double sink = 0, elapsed = 0;
      do {
        sink += loop(kInnerIters);
        done += kInnerIters;
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (elapsed < seconds);
      rates[t] = done * flops_per_iter / elapsed * 1e-9 + (sink == 12345.678 ? 1e-30 : 0.0);
    });
  while (ready.load() < threads) std::this_thread::yield();
  go.store(true);
  for (auto& th : pool) th.join();
  double total = 0;
  for (double r : rates) total += r;
  return total;
}

}  // namespace fl
