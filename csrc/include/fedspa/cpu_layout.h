// Layout helpers for the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fedspa/cpu_features.h"

namespace fedspa {

#if defined(FEDSPA_X86_DISPATCH)
// dst[0..7][0..7] = transpose of src[0..7][0..7] (row strides lds, ldd), in registers.
__attribute__((target("avx2"))) inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// The tile [r0, re) x [c0, ce) of dst (row stride ldd) from src, where element (r, c) is src[c * lds + r].
__attribute__((target("avx2"))) inline void transpose_tile_avx2(const float* src, int64_t lds, float* dst,
                                                                  int64_t ldd, int64_t r0, int64_t re, int64_t c0,
                                                                  int64_t ce) {
  int64_t r = r0;
  for (; r + 8 <= re; r += 8) {
    int64_t c = c0;
    for (; c + 8 <= ce; c += 8) transpose_8x8(src + c * lds + r, lds, dst + r * ldd + c, ldd);
    for (; c < ce; ++c) {
      for (int64_t i = 0; i < 8; ++i) dst[(r + i) * ldd + c] = src[c * lds + r + i];
    }
  }
  for (; r < re; ++r) {
    for (int64_t c = c0; c < ce; ++c) dst[r * ldd + c] = src[c * lds + r];
  }
}
#endif

// dst (rows x cols, row-major) = the transpose of src, whose element (r, c) is src[c * lds + r], for fp32 on
// AVX2: 64 x 64 tiles (16 KiB in, 16 KiB out, both in L1), split between the threads tile by tile, so that a
// matrix of few rows (the batch) keeps every thread busy too. Returns false (nothing written) without AVX2.
inline bool transpose_into(const float* src, int64_t lds, float* dst, int64_t rows, int64_t cols) {
#if defined(FEDSPA_X86_DISPATCH)
  if (!cpu_has_avx2_fma()) return false;
  constexpr int64_t kTile = 64;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  at::parallel_for(0, row_tiles * col_tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / col_tiles) * kTile;
      const int64_t c0 = (t % col_tiles) * kTile;
      transpose_tile_avx2(src, lds, dst, cols, r0, std::min(rows, r0 + kTile), c0, std::min(cols, c0 + kTile));
    }
  });
  return true;
#else
  (void)src, (void)lds, (void)dst, (void)rows, (void)cols;
  return false;
#endif
}

// A row-major copy of a 2-D tensor. torch's copy of a column-major (transposed) view runs on one thread
// (1024 x 256 fp32: 0.13 ms); fp32 views are transposed here in parallel 8 x 8 register blocks (0.08 ms).
inline at::Tensor row_major(const at::Tensor& t) {
  if (t.dim() != 2 || t.is_contiguous()) return t.contiguous();
  const int64_t rows = t.size(0);
  const int64_t cols = t.size(1);
  if (t.scalar_type() == at::kFloat && t.stride(0) == 1 && t.stride(1) >= rows) {
    at::Tensor out = at::empty({rows, cols}, t.options());
    if (transpose_into(t.data_ptr<float>(), t.stride(1), out.data_ptr<float>(), rows, cols)) return out;
  }
  return t.contiguous();
}

}  // namespace fedspa
