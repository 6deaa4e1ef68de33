// The machine's arithmetic peak, measured (not looked up): a register-only multiply-add loop with enough
// independent accumulators to fill both FMA pipes, run on `threads` threads for about `seconds`.
#pragma once

namespace fl {

// kind: "fp32" (FMA) or "bf16" (dot-product of bf16 pairs into fp32). Returns GFLOP/s over all threads.
double measure_peak_gflops(const char* kind, int threads, double seconds);

}  // namespace fl
