// CPU kernel of fedspa::spmm_transposed: out (cols x N) = A^T @ dense, for A (rows x cols) in CSR and dense
// (rows x N), straight from the CSR order: no transposed copy of the pattern is kept or built.
//
// Scatter form. For each row r of A, a slice dense[r, j:j+64] stays in registers while the row's nonzeros add
// value * dense[r, j:j+64] into out[col, j:j+64], two nonzeros at a time (two independent read-modify-write chains).
// out's rows (A's columns) are cut into panels: a task owns one panel (and one 64-wide block of N), walks every
// row's nonzeros that fall in its panel (their bounds found once by binary search, as the SpMM kernel's panels), and
// writes only its panel's rows, so threads never write the same element, every nonzero is read once per block, and
// the panel's slice of out, which the scatter visits in a data-dependent order, stays in L2. The out row of the
// nonzero a few ahead is prefetched (its order defeats the hardware prefetcher).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fedspa/cpu_features.h"
#include "fedspa/cpu_layout.h"
#include "fedspa/csr_checks.h"
#include "fedspa/csr_panels.h"

namespace fedspa {
namespace {

constexpr const char* kOp = "spmm_transposed";
constexpr int kPrefetchDistance = 4;
constexpr int64_t kL2Budget = int64_t{512} << 10;  // bytes of out's panel slice a thread keeps in L2
constexpr int64_t kMaxWidth = 64;

// Columns [j0, j1) of out, every row of A (portable path: fp64, CPUs without AVX2, and column tails).
template <typename T, typename I>
void scatter_generic(const T* values, const RowRanges& ranges, const I* col, const T* dense, T* out,
                     int64_t rows, int64_t n, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* d = dense + r * n;
    for (int64_t k = ranges.begin[r * ranges.stride]; k < ranges.end[r * ranges.stride]; ++k) {
      const T v = values[k];
      T* o = out + static_cast<int64_t>(col[k]) * n;
      for (int64_t j = j0; j < j1; ++j) o[j] += v * d[j];
    }
  }
}

#if defined(FEDSPA_X86_DISPATCH)
// Columns [j, j + 8 V) of out, every row of A: V AVX2 vectors of dense held per row.
template <int V, typename I>
__attribute__((target("avx2,fma"))) void scatter_avx2(const float* values, const RowRanges& ranges,
                                                      const I* col, const float* dense, float* out,
                                                      int64_t rows, int64_t n, int64_t j) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = ranges.begin[r * ranges.stride];
    const int64_t e = ranges.end[r * ranges.stride];
    if (b == e) continue;
    __m256 d[V];
    for (int u = 0; u < V; ++u) d[u] = _mm256_loadu_ps(dense + r * n + j + 8 * u);
    int64_t k = b;
    for (; k + 1 < e; k += 2) {  // two nonzeros per step: two independent read-modify-write chains in flight
      if (k + kPrefetchDistance + 1 < e) {
        for (int ahead = 0; ahead < 2; ++ahead) {
          const char* next = reinterpret_cast<const char*>(
              out + static_cast<int64_t>(col[k + kPrefetchDistance + ahead]) * n + j);
          for (int line = 0; line < V; line += 2) _mm_prefetch(next + 64 * (line / 2), _MM_HINT_T0);
        }
      }
      const __m256 v0 = _mm256_set1_ps(values[k]);
      const __m256 v1 = _mm256_set1_ps(values[k + 1]);
      float* o0 = out + static_cast<int64_t>(col[k]) * n + j;
      float* o1 = out + static_cast<int64_t>(col[k + 1]) * n + j;  // another row of out: columns are distinct
      for (int u = 0; u < V; ++u) {
        const __m256 a0 = _mm256_fmadd_ps(v0, d[u], _mm256_loadu_ps(o0 + 8 * u));
        const __m256 a1 = _mm256_fmadd_ps(v1, d[u], _mm256_loadu_ps(o1 + 8 * u));
        _mm256_storeu_ps(o0 + 8 * u, a0);
        _mm256_storeu_ps(o1 + 8 * u, a1);
      }
    }
    if (k < e) {
      const __m256 v = _mm256_set1_ps(values[k]);
      float* o = out + static_cast<int64_t>(col[k]) * n + j;
      for (int u = 0; u < V; ++u) _mm256_storeu_ps(o + 8 * u, _mm256_fmadd_ps(v, d[u], _mm256_loadu_ps(o + 8 * u)));
    }
  }
}

// Columns [j0, j1) with the widest passes that fit, then the scalar tail.
template <typename I>
void scatter_block_avx2(const float* values, const RowRanges& ranges, const I* col, const float* dense,
                        float* out, int64_t rows, int64_t n, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 64 <= j1; j += 64) scatter_avx2<8>(values, ranges, col, dense, out, rows, n, j);
  if (j + 32 <= j1) {
    scatter_avx2<4>(values, ranges, col, dense, out, rows, n, j);
    j += 32;
  }
  if (j + 16 <= j1) {
    scatter_avx2<2>(values, ranges, col, dense, out, rows, n, j);
    j += 16;
  }
  if (j + 8 <= j1) {
    scatter_avx2<1>(values, ranges, col, dense, out, rows, n, j);
    j += 8;
  }
  if (j < j1) scatter_generic<float, I>(values, ranges, col, dense, out, rows, n, j, j1);
}
#endif

template <typename T, typename I>
void spmm_transposed_impl(const T* values, const int64_t* crow, const I* col, const T* dense, T* out,
                          int64_t rows, int64_t cols, int64_t n) {
  const int64_t width = std::min(n, kMaxWidth);
  const int64_t blocks = (n + kMaxWidth - 1) / kMaxWidth;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // panels of out's rows: each panel's slice (panel x width) within kL2Budget, and enough tasks for the threads
  int64_t panel = std::max<int64_t>(1, kL2Budget / std::max<int64_t>(1, width * static_cast<int64_t>(sizeof(T))));
  if (blocks * ((cols + panel - 1) / panel) < threads) panel = (cols + threads * blocks - 1) / (threads * blocks);
  panel = std::max<int64_t>(1, std::min(panel, cols));
  const int64_t panels = (cols + panel - 1) / panel;
  const std::vector<int64_t> bounds = panels > 1 ? panel_bounds(crow, col, rows, panel, panels)
                                                 : std::vector<int64_t>{};
  at::parallel_for(0, panels * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t p = task / blocks;
      const int64_t j0 = (task % blocks) * kMaxWidth;
      const int64_t j1 = std::min(n, j0 + kMaxWidth);
      const RowRanges ranges = panel_ranges(crow, bounds, panels, p);
#if defined(FEDSPA_X86_DISPATCH)
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2_fma()) {
          scatter_block_avx2(values, ranges, col, dense, out, rows, n, j0, j1);
          continue;
        }
      }
#endif
      scatter_generic<T, I>(values, ranges, col, dense, out, rows, n, j0, j1);
    }
  });
}

at::Tensor spmm_transposed_cpu(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& dense, int64_t cols) {
  TORCH_CHECK_TYPE(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
                   kOp, " (cpp): values must be a 1-D float32 or float64 tensor, got ", values.scalar_type(),
                   " of shape ", values.sizes(), " (half precision runs on the reference, cuda and triton backends)");
  TORCH_CHECK_VALUE(dense.dim() == 2, kOp, ": dense must be 2-D (rows x N), got shape ", dense.sizes());
  TORCH_CHECK_TYPE(dense.scalar_type() == values.scalar_type(), kOp, ": dense is ", dense.scalar_type(),
                   " but values are ", values.scalar_type());
  TORCH_CHECK_VALUE(dense.device() == values.device(), kOp, ": dense is on ", dense.device(), " but values are on ",
                    values.device());
  TORCH_CHECK_VALUE(cols >= 0, kOp, ": cols must be >= 0, got ", cols);
  check_csr_metadata(kOp, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), kOp, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  TORCH_CHECK_VALUE(dense.size(0) == crow.numel() - 1, kOp, ": the pattern has ", crow.numel() - 1,
                    " rows but dense has shape ", dense.sizes());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(kOp, crow_c, col_c, cols);  // every column is checked before anything is written through it
  const at::Tensor values_c = values.contiguous();
  const at::Tensor dense_c = row_major(dense);
  at::Tensor out = at::zeros({cols, dense.size(1)}, dense.options());
  if (cols == 0 || dense.size(1) == 0) return out;
  dispatch_col_index(col_c, [&](auto index) {
    using I = decltype(index);
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "spmm_transposed_cpu", [&] {
      spmm_transposed_impl<scalar_t>(values_c.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(),
                                     col_c.data_ptr<I>(), dense_c.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), crow.numel() - 1, cols, dense.size(1));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(FEDSPA_NAMESPACE, CPU, m) { m.impl("spmm_transposed", &spmm_transposed_cpu); }

}  // namespace fedspa
