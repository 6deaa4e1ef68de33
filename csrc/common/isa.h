// Which instruction set the CPU kernels run with. Kernel files are compiled once per ISA, each inside its own
// namespace (fl::baseline, fl::avx2, fl::avx512); FL_DISPATCH_ISA calls the variant picked at run time.
#pragma once

namespace fl {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The best ISA this CPU supports and the build contains. FUSEDLAYERS_ISA=baseline|avx2|avx512 lowers it
// (useful to test every variant on one machine); it is never raised above what the CPU can run.
Isa active_isa();
Isa best_supported_isa();
const char* isa_name(Isa isa);
bool cpu_has_avx512_bf16();
// Whether the CPU is Intel's (MKL, the BLAS torch exports, is tuned for them).
bool cpu_is_intel();

}  // namespace fl

#if defined(FL_HAVE_X86_ISAS)
#define FL_DISPATCH_ISA(fn, ...)                                      \
  do {                                                                \
    switch (::fl::active_isa()) {                                     \
      case ::fl::Isa::avx512: ::fl::avx512::fn(__VA_ARGS__); break;   \
      case ::fl::Isa::avx2: ::fl::avx2::fn(__VA_ARGS__); break;       \
      default: ::fl::baseline::fn(__VA_ARGS__); break;                \
    }                                                                 \
  } while (0)
// Declares the same kernel entry points in every ISA namespace.
#define FL_DECLARE_FOR_EACH_ISA(DECLS) \
  namespace fl::baseline { DECLS }     \
  namespace fl::avx2 { DECLS }         \
  namespace fl::avx512 { DECLS }
#else
#define FL_DISPATCH_ISA(fn, ...) ::fl::baseline::fn(__VA_ARGS__)
#define FL_DECLARE_FOR_EACH_ISA(DECLS) \
  namespace fl::baseline { DECLS }
#endif
