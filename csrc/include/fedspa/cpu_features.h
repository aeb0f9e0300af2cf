// Run-time CPU feature checks for kernels compiled with __attribute__((target(...))) variants.
#pragma once

namespace fedspa {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEDSPA_X86_DISPATCH 1
// AVX2 + FMA (x86-64-v3): 8-wide fp32 FMA micro-kernels.
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace fedspa
