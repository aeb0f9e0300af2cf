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
// AVX-512F: 16-wide fp32 with 32 vector registers (used where a kernel needs more than AVX2's 16 registers).
inline bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
inline bool cpu_has_avx512f() { return false; }
#endif

}  // namespace fedspa
