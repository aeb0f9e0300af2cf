// The sum of an AVX2 register's eight floats, for the CPU kernels' dot products.
#pragma once

#include "fedspa/cpu_features.h"

#if defined(FEDSPA_X86_DISPATCH)
#include <immintrin.h>

namespace fedspa {

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

}  // namespace fedspa
#endif
