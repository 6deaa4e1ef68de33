#include "common/isa.h"

#include <cstdlib>
#include <cstring>

namespace fl {

namespace {

Isa detect_best() {
#if defined(FL_HAVE_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

Isa detect_active() {
  Isa best = detect_best();
  const char* env = std::getenv("FUSEDLAYERS_ISA");
  if (env == nullptr) return best;
  Isa wanted = best;
  if (std::strcmp(env, "baseline") == 0) wanted = Isa::baseline;
  else if (std::strcmp(env, "avx2") == 0) wanted = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0) wanted = Isa::avx512;
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

}  // namespace

Isa best_supported_isa() {
  static const Isa isa = detect_best();
  return isa;
}

Isa active_isa() {
  static const Isa isa = detect_active();
  return isa;
}

bool cpu_has_avx512_bf16() {
#if defined(FL_HAVE_X86_ISAS)
  return best_supported_isa() == Isa::avx512;
#else
  return false;
#endif
}

bool cpu_is_intel() {
#if defined(FL_HAVE_X86_ISAS)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace fl
