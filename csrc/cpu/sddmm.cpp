// CPU kernel of fedspa::sddmm: out[k] = dot(a[r_k, :], bt[c_k, :]) for every nonzero k of a CSR pattern.
//
// Two paths, both over threads owning contiguous row ranges:
//  * row-block (AVX-512, used when a block of rows hits each column about once or more): the nonzeros of a
//    block of 64 rows are counting-sorted by column, so that each row of bt (a 256-wide K-slice, in sixteen zmm
//    registers) is loaded once per block and dotted with every row of the block that hits it (two at a time).
//    The dense operand is then read once per block instead of once per nonzero: measured at K = 256, 4096^2,
//    density 0.1 on a 2-core Zen 4, 16.2 -> 12.0 ms (53 -> 71 GFLOP/s) in a standalone harness.
//  * per row (AVX-512, else AVX2, else plain C++ for float64): K is walked in slices of 64; the slice of a[r]
//    sits in registers while each nonzero's slice of bt is loaded and multiplied. With AVX-512 sixteen nonzeros'
//    partial products are reduced together by one transposed tree and stored as one vector (512 x 3136, K = 64,
//    d = 0.05, one thread: 0.53-0.73 -> 0.24 ms); with AVX2 each nonzero is reduced alone and the bt rows of the
//    nonzero 4 ahead are prefetched (K = 256, 1024^2, density 0.1, 30 -> 65 GFLOP/s).
//    Slices of 32 take two registers. Used instead of the row blocks when K is 32, 64, 96 or 128
//    (per_row_beats_row_blocks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fedspa/avx2_sum.h"
#include "fedspa/cpu_features.h"
#include "fedspa/cpu_layout.h"
#include "fedspa/csr_checks.h"

namespace fedspa {
namespace {

constexpr const char* kOp = "sddmm";
constexpr int kPrefetchDistance = 4;

// One K-slice [j0, j1) of the dot products of row r with its nonzeros [b, e): acc[k] gets the slice's partial
// sum (assigned on the first slice, added after).
template <typename T, typename I>
void sddmm_slice_generic(const T* a_row, const T* bt, const I* col, int64_t b, int64_t e, int64_t K,
                         int64_t j0, int64_t j1, bool first, T* acc) {
  for (int64_t k = b; k < e; ++k) {
    const T* b_row = bt + static_cast<int64_t>(col[k]) * K;
    T lanes[8] = {};  // 8 independent sums: vectorizable without reassociating one sum
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      for (int u = 0; u < 8; ++u) lanes[u] += a_row[j + u] * b_row[j + u];
    }
    T sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; j < j1; ++j) sum += a_row[j] * b_row[j];
    acc[k] = first ? sum : acc[k] + sum;
  }
}

#if defined(FEDSPA_X86_DISPATCH)
// A full 64-wide K-slice: a's slice in eight registers, each nonzero's bt slice streamed and reduced.
template <typename I>
__attribute__((target("avx2,fma"))) void sddmm_slice64_avx2(const float* a_row, const float* bt, const I* col,
                                                            int64_t b, int64_t e, int64_t K, int64_t j0, bool first,
                                                            float* acc) {
  __m256 a_slice[8];
  for (int u = 0; u < 8; ++u) a_slice[u] = _mm256_loadu_ps(a_row + j0 + 8 * u);
  for (int64_t k = b; k < e; ++k) {
    if (k + kPrefetchDistance < e) {
      const char* next = reinterpret_cast<const char*>(bt + static_cast<int64_t>(col[k + kPrefetchDistance]) * K + j0);
      for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    }
    const float* b_row = bt + static_cast<int64_t>(col[k]) * K + j0;
    __m256 s0 = _mm256_mul_ps(a_slice[0], _mm256_loadu_ps(b_row));
    __m256 s1 = _mm256_mul_ps(a_slice[1], _mm256_loadu_ps(b_row + 8));
    __m256 s2 = _mm256_mul_ps(a_slice[2], _mm256_loadu_ps(b_row + 16));
    __m256 s3 = _mm256_mul_ps(a_slice[3], _mm256_loadu_ps(b_row + 24));
    s0 = _mm256_fmadd_ps(a_slice[4], _mm256_loadu_ps(b_row + 32), s0);
    s1 = _mm256_fmadd_ps(a_slice[5], _mm256_loadu_ps(b_row + 40), s1);
    s2 = _mm256_fmadd_ps(a_slice[6], _mm256_loadu_ps(b_row + 48), s2);
    s3 = _mm256_fmadd_ps(a_slice[7], _mm256_loadu_ps(b_row + 56), s3);
    const float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    acc[k] = first ? sum : acc[k] + sum;
  }
}
#endif

#if defined(FEDSPA_X86_DISPATCH)
// GCC 12's AVX-512 headers warn about their own _mm256_undefined_pd() (GCC bug 105593; see the row-block path).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// The 16 sums of p[0..15] (each a 16-lane partial sum) as one vector: lane j = the sum of p[j]'s lanes. A transposed
// reduction tree, 45 instructions for 16 sums where one _mm512_reduce_add_ps takes about 8 per sum.
__attribute__((target("avx512f"))) inline __m512 sum16_avx512(const __m512* p) {
  __m512 pairs[8];  // per 128-bit lane: [p0 even + odd halves, p1 ..., p0 ..., p1 ...]
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  }
  __m512 quads[4];  // per 128-bit lane: the lane's sums of p[4i .. 4i+3]
  for (int i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  }
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

// One nonzero's partial products over a 16 V-wide slice (V = 2 or 4) with a's slice (V registers) as a 16-lane
// vector.
template <int V>
__attribute__((target("avx512f,avx2,fma"))) inline __m512 sddmm_partial_avx512(const __m512* a_slice,
                                                                                const float* b_row) {
  static_assert(V == 2 || V == 4);
  __m512 s = _mm512_mul_ps(a_slice[0], _mm512_loadu_ps(b_row));
  __m512 t = _mm512_mul_ps(a_slice[1], _mm512_loadu_ps(b_row + 16));
  if constexpr (V == 4) {
    s = _mm512_fmadd_ps(a_slice[2], _mm512_loadu_ps(b_row + 32), s);
    t = _mm512_fmadd_ps(a_slice[3], _mm512_loadu_ps(b_row + 48), t);
  }
  return _mm512_add_ps(s, t);
}

// A full 16 V-wide K-slice (64 or 32) of row r's nonzeros [b, e), sixteen nonzeros at a time: their partial products
// stay in registers and one transposed reduction gives the 16 dot products, stored contiguously (CSR order). The
// independent loads of 16 random bt rows overlap in the out-of-order window, with no reduction between them.
template <int V, typename I>
__attribute__((target("avx512f,avx2,fma"))) void sddmm_slice_avx512(const float* a_row, const float* bt,
                                                                   const I* col, int64_t b, int64_t e, int64_t K,
                                                                   int64_t j0, bool first, float* acc) {
  __m512 a_slice[V];
  for (int u = 0; u < V; ++u) a_slice[u] = _mm512_loadu_ps(a_row + j0 + 16 * u);
  int64_t k = b;
  for (; k + 16 <= e; k += 16) {
    __m512 p[16];
    for (int j = 0; j < 16; ++j) {
      p[j] = sddmm_partial_avx512<V>(a_slice, bt + static_cast<int64_t>(col[k + j]) * K + j0);
    }
    __m512 sums = sum16_avx512(p);
    if (!first) sums = _mm512_add_ps(sums, _mm512_loadu_ps(acc + k));
    _mm512_storeu_ps(acc + k, sums);
  }
  if (k < e) {
    const int n = static_cast<int>(e - k);
    __m512 p[16];
    for (int j = 0; j < 16; ++j) {
      p[j] = j < n ? sddmm_partial_avx512<V>(a_slice, bt + static_cast<int64_t>(col[k + j]) * K + j0)
                   : _mm512_setzero_ps();
    }
    const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << n) - 1);
    __m512 sums = sum16_avx512(p);
    if (!first) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(lanes, acc + k));
    _mm512_mask_storeu_ps(acc + k, lanes, sums);
  }
}
#pragma GCC diagnostic pop
#endif

// ---- row-block path --------------------------------------------------------------------------------------
constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockSlice = 256;  // K-slice of the row-block path: 16 zmm registers of bt

// The nonzeros of rows [r0, r1) sorted by column (stable, so rows ascend within a column): entry i is nonzero
// order[i] of row block_row[i]; column c's entries end at column_end[c].
struct BlockByColumn {
  std::vector<int64_t> column_end;
  std::vector<int64_t> order;
  std::vector<int32_t> block_row;

  template <typename I>
  void build(const int64_t* crow, const I* col, int64_t r0, int64_t r1, int64_t cols) {
    const int64_t n = crow[r1] - crow[r0];
    column_end.assign(cols + 1, 0);
    order.resize(n);
    block_row.resize(n);
    for (int64_t k = crow[r0]; k < crow[r1]; ++k) ++column_end[col[k] + 1];
    for (int64_t c = 0; c < cols; ++c) column_end[c + 1] += column_end[c];
    // column_end[c] is now column c's start; the fill below advances it to the end
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const int64_t slot = column_end[col[k]]++;
        order[slot] = k;
        block_row[slot] = static_cast<int32_t>(r - r0);
      }
    }
  }
};

#if defined(FEDSPA_X86_DISPATCH)
// GCC 12's AVX-512 headers build vectors from _mm256_undefined_pd(), which -Wmaybe-uninitialized reports (GCC bug
// 105593, fixed in GCC 13); the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One K-slice of width w (16 * (V - 1) < w <= 16 * V) for one row block: bt's slice of each hit column is held in
// V zmm registers and dotted with the slices of a's rows that hit it, two rows at a time. Masked loads keep
// every read inside the slice.
template <int V>
__attribute__((target("avx512f,avx2,fma"))) void sddmm_block_slice_avx512(const float* a_block, const float* bt,
                                                                 const BlockByColumn& sorted, int64_t cols, int64_t K,
                                                                 int64_t j0, int64_t w, bool first, float* acc) {
  __mmask16 lanes[V];
  for (int u = 0; u < V; ++u) {
    const int64_t valid = std::clamp<int64_t>(w - 16 * u, 0, 16);
    lanes[u] = static_cast<__mmask16>((uint32_t{1} << valid) - 1);
  }
  const int64_t* order = sorted.order.data();
  const int32_t* block_row = sorted.block_row.data();
  int64_t i = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t end = sorted.column_end[c];
    if (i == end) continue;
    const float* b_row = bt + c * K + j0;
    __m512 b[V];
    for (int u = 0; u < V; ++u) b[u] = _mm512_maskz_loadu_ps(lanes[u], b_row + 16 * u);
    for (; i + 2 <= end; i += 2) {
      const float* a0 = a_block + static_cast<int64_t>(block_row[i]) * K + j0;
      const float* a1 = a_block + static_cast<int64_t>(block_row[i + 1]) * K + j0;
      __m512 s0 = _mm512_mul_ps(b[0], _mm512_maskz_loadu_ps(lanes[0], a0));
      __m512 t0 = _mm512_mul_ps(b[0], _mm512_maskz_loadu_ps(lanes[0], a1));
      __m512 s1 = _mm512_setzero_ps();
      __m512 t1 = _mm512_setzero_ps();
      for (int u = 1; u < V; u += 2) {
        s1 = _mm512_fmadd_ps(b[u], _mm512_maskz_loadu_ps(lanes[u], a0 + 16 * u), s1);
        t1 = _mm512_fmadd_ps(b[u], _mm512_maskz_loadu_ps(lanes[u], a1 + 16 * u), t1);
        if (u + 1 < V) {
          s0 = _mm512_fmadd_ps(b[u + 1], _mm512_maskz_loadu_ps(lanes[u + 1], a0 + 16 * (u + 1)), s0);
          t0 = _mm512_fmadd_ps(b[u + 1], _mm512_maskz_loadu_ps(lanes[u + 1], a1 + 16 * (u + 1)), t0);
        }
      }
      const float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
      const float t = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
      acc[order[i]] = first ? s : acc[order[i]] + s;
      acc[order[i + 1]] = first ? t : acc[order[i + 1]] + t;
    }
    if (i < end) {
      const float* a0 = a_block + static_cast<int64_t>(block_row[i]) * K + j0;
      __m512 s0 = _mm512_mul_ps(b[0], _mm512_maskz_loadu_ps(lanes[0], a0));
      for (int u = 1; u < V; ++u) s0 = _mm512_fmadd_ps(b[u], _mm512_maskz_loadu_ps(lanes[u], a0 + 16 * u), s0);
      const float s = _mm512_reduce_add_ps(s0);
      acc[order[i]] = first ? s : acc[order[i]] + s;
      ++i;
    }
  }
}

// The row-block path over all rows; acc gets every nonzero's dot product in CSR order.
template <typename I>
void sddmm_row_blocks_avx512(const float* a, const float* bt, const int64_t* crow, const I* col,
                             int64_t rows, int64_t cols, int64_t K, float* acc, const FusedCsrCheck& check) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t block0, int64_t block1) {
    BlockByColumn sorted;
    for (int64_t block = block0; block < block1; ++block) {
      const int64_t r0 = block * kBlockRows;
      const int64_t r1 = std::min(rows, r0 + kBlockRows);
      if (!check.rows_ok(r0, r1)) continue;  // before the columns index anything
      sorted.build(crow, col, r0, r1, cols);
      const float* a_block = a + r0 * K;
      for (int64_t j0 = 0; j0 < K; j0 += kBlockSlice) {
        const int64_t w = std::min(kBlockSlice, K - j0);
        const bool first = j0 == 0;
        switch ((w + 15) / 16) {
          case 1: sddmm_block_slice_avx512<1>(a_block, bt, sorted, cols, K, j0, w, first, acc); break;
          case 2: sddmm_block_slice_avx512<2>(a_block, bt, sorted, cols, K, j0, w, first, acc); break;
          case 3: case 4: sddmm_block_slice_avx512<4>(a_block, bt, sorted, cols, K, j0, w, first, acc); break;
          case 5: case 6: case 7: case 8:
            sddmm_block_slice_avx512<8>(a_block, bt, sorted, cols, K, j0, w, first, acc);
            break;
          default: sddmm_block_slice_avx512<16>(a_block, bt, sorted, cols, K, j0, w, first, acc); break;
        }
      }
    }
  });
}
#pragma GCC diagnostic pop
#endif

// The row-block path pays a pass over all columns per block: worth it when a block hits each column about once.
bool use_row_blocks(int64_t rows, int64_t cols, int64_t nnz, int64_t K) {
  if (rows == 0 || nnz == 0 || K == 0) return false;
  const int64_t block_rows = std::min(rows, kBlockRows);
  return nnz * block_rows >= rows * cols;  // expected nonzeros per block >= cols
}

// With K of 32 to 128 in 32-wide steps (a batch of 32, 64, 96 or 128) the per-row path's sixteen-at-a-time
// reduction beats the row blocks at every shape measured (2-core Zen 4, 1 and 2 threads; results/sddmm_2026-12-08.md):
// at 512 x 3136 (a CNN's fc) 2.0-3.0x at K = 64, 1.3-1.6x at K = 128 (1 thread), 2.7-3.9x at K = 32, 1.4-1.8x at
// K = 96, up to 4096 x 4096; at K = 256 the row blocks win on large operands (4096 x 4096, d = 0.1: 1.5x), and other
// K would leave the per-row path a scalar tail.
bool per_row_beats_row_blocks(int64_t K) { return K % 32 == 0 && K <= 128; }

// 2-D blocking as in spmm.cpp: K in slices of 64, and bt's rows (the pattern's columns) in panels so that one
// panel's slice (panel x 64) fits in about 512 KiB of L2.
constexpr int64_t kL2Budget = int64_t{512} << 10;
constexpr int64_t kSlice = 64;

template <typename T, typename I>
void sddmm_impl(const at::Tensor& a, const at::Tensor& bt, const int64_t* crow, const I* col, at::Tensor& out,
                const FusedCsrCheck& check) {
  const int64_t rows = a.size(0);
  const int64_t cols = bt.size(0);
  const int64_t K = a.size(1);
  const T* a_data = a.data_ptr<T>();
  const T* bt_data = bt.data_ptr<T>();
  const int64_t nnz = crow[rows];
  T* acc = out.data_ptr<T>();  // dot products in CSR order
  [[maybe_unused]] bool per_row_avx512 = false;
#if defined(FEDSPA_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    per_row_avx512 = cpu_has_avx512f();
    if (per_row_avx512 && !per_row_beats_row_blocks(K) && use_row_blocks(rows, cols, nnz, K)) {
      sddmm_row_blocks_avx512(a_data, bt_data, crow, col, rows, cols, K, acc, check);
      return;
    }
  }
#endif
  const int64_t panel = std::max<int64_t>(1, kL2Budget / (kSlice * static_cast<int64_t>(sizeof(T))));
  const int64_t panels = std::max<int64_t>(1, (cols + panel - 1) / panel);
  std::vector<int64_t> bounds;  // bounds[r * (panels + 1) + p]: first nonzero of row r with col >= p * panel
  if (panels > 1) {
    bounds.resize(rows * (panels + 1));
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t k = crow[r];
        for (int64_t p = 0; p < panels; ++p) {
          k = std::lower_bound(col + k, col + crow[r + 1], p * panel) - col;
          bounds[r * (panels + 1) + p] = k;
        }
        bounds[r * (panels + 1) + panels] = crow[r + 1];
      }
    });
  }
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(rows, 1) * K);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (!check.rows_ok(r0, r1)) return;  // before any row of bt is read through these rows' columns
    if (K == 0) {
      std::fill(acc + crow[r0], acc + crow[r1], T(0));
      return;
    }
    for (int64_t j0 = 0; j0 < K; j0 += kSlice) {
      const int64_t j1 = std::min(K, j0 + kSlice);
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = panels == 1 ? crow[r] : bounds[r * (panels + 1) + p];
          const int64_t e = panels == 1 ? crow[r + 1] : bounds[r * (panels + 1) + p + 1];
          if (b == e) continue;
          const T* a_row = a_data + r * K;
#if defined(FEDSPA_X86_DISPATCH)
          if constexpr (std::is_same_v<T, float>) {
            if (j1 - j0 == kSlice && per_row_avx512) {
              sddmm_slice_avx512<4>(a_row, bt_data, col, b, e, K, j0, j0 == 0, acc);
              continue;
            }
            if (j1 - j0 == kSlice / 2 && per_row_avx512) {
              sddmm_slice_avx512<2>(a_row, bt_data, col, b, e, K, j0, j0 == 0, acc);
              continue;
            }
            if (j1 - j0 == kSlice && cpu_has_avx2_fma()) {
              sddmm_slice64_avx2(a_row, bt_data, col, b, e, K, j0, j0 == 0, acc);
              continue;
            }
          }
#endif
          sddmm_slice_generic(a_row, bt_data, col, b, e, K, j0, j1, j0 == 0, acc);
        }
      }
    }
  });
}

at::Tensor sddmm_cpu(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, kOp,
                   " (cpp): a must be float32 or float64, got ", a.scalar_type(),
                   " (half precision runs on the reference, cuda and triton backends)");
  TORCH_CHECK_TYPE(bt.scalar_type() == a.scalar_type(), kOp, ": bt is ", bt.scalar_type(), " but a is ",
                   a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2 && bt.dim() == 2 && a.size(1) == bt.size(1), kOp,
                    ": a (rows x K) and bt (cols x K) must be 2-D with equal K, got ", a.sizes(), " and ", bt.sizes());
  TORCH_CHECK_VALUE(bt.device() == a.device(), kOp, ": bt is on ", bt.device(), " but a is on ", a.device());
  check_csr_metadata(kOp, crow, col, a.device());
  TORCH_CHECK_VALUE(crow.numel() == a.size(0) + 1, kOp, ": crow_indices has ", crow.numel(), " entries but a has ",
                    a.size(0), " rows");
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  const FusedCsrCheck check(kOp, crow_c, col_c, bt.size(0));
  const at::Tensor a_c = row_major(a);
  const at::Tensor bt_c = row_major(bt);
  at::Tensor out = at::empty({col.numel()}, a.options());
  dispatch_col_index(col_c, [&](auto index) {
    using I = decltype(index);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sddmm_cpu", [&] {
      sddmm_impl<scalar_t>(a_c, bt_c, crow_c.data_ptr<int64_t>(), col_c.data_ptr<I>(), out, check);
    });
  });
  check.finish();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(FEDSPA_NAMESPACE, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace fedspa
