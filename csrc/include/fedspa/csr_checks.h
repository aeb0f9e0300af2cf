// Structural checks of a CSR pattern, run by every native kernel entry before it reads through the indices, so
// that no Python-side state is trusted for memory safety. The messages are those of the Python checks
// (fedspa_kernels/_checks.py).
//
// A pattern (crow int64 of rows + 1, col int16 or int32 of nnz) is valid for a matrix with num_cols columns when
//   crow[0] == 0, crow never decreases, crow[rows] == nnz, and within each row the columns strictly increase and
//   lie in [0, num_cols)  (strictly increasing: only a row's first and last column need the range check).
//
// check_csr(): on the CPU one parallel pass over the pattern (O(rows) for crow, one read of col), and the exact
// check only to word the error; elsewhere the exact check with ATen ops on the pattern's device (two syncs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "fedspa/cpu_features.h"

#if defined(FEDSPA_X86_DISPATCH) && !defined(__CUDACC__)
#include <immintrin.h>
#define FEDSPA_CSR_CHECK_AVX2 1
#endif

// The op namespace the kernels register under. benchmarks/pattern_check_cost.py builds a twin of the SpMM and SDDMM
// kernels under another namespace with FEDSPA_BENCHMARK_UNCHECKED (the fused row check compiled out), to time the
// check inside the kernel; no build of the package defines it.
#ifndef FEDSPA_NAMESPACE
#define FEDSPA_NAMESPACE fedspa
#endif

namespace fedspa {

// Column indices are int16 (2 bytes per nonzero; what SparseMatrix stores for matrices of up to 32768 columns) or
// int32. Calls f with a value of the index type: `dispatch_col_index(col, [&](auto i) { using I = decltype(i); ... })`.
template <typename F>
decltype(auto) dispatch_col_index(const at::Tensor& col, F&& f) {
  if (col.scalar_type() == at::kShort) return f(int16_t{0});
  return f(int32_t{0});
}

// dtypes, dims and devices of a CSR structure (cheap, no data read).
inline void check_csr_metadata(const char* op, const at::Tensor& crow, const at::Tensor& col,
                               const at::Device& device) {
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kLong && crow.dim() == 1 && crow.numel() >= 1, op,
                   ": crow_indices must be a non-empty 1-D int64 tensor, got ", crow.scalar_type(), " of shape ",
                   crow.sizes());
  TORCH_CHECK_TYPE((col.scalar_type() == at::kShort || col.scalar_type() == at::kInt) && col.dim() == 1, op,
                   ": col_indices must be a 1-D int16 or int32 tensor, got ", col.scalar_type(), " of shape ",
                   col.sizes());
  TORCH_CHECK_VALUE(crow.device() == device, op, ": crow_indices is on ", crow.device(), " but the operands are on ",
                    device);
  TORCH_CHECK_VALUE(col.device() == device, op, ": col_indices is on ", col.device(), " but the operands are on ",
                    device);
}

// The exact check with ATen ops (any device); raises ValueError naming the first offender.
inline void check_csr_exact(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t num_cols) {
  const int64_t nnz = col.numel();
  const int64_t rows = crow.numel() - 1;
  const at::Tensor ends = at::stack({crow[0], crow[-1]}).cpu();
  const int64_t first = ends[0].item<int64_t>();
  const int64_t last = ends[1].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0 && last == nnz, op, ": crow_indices must start at 0 and end at nnz=", nnz, ", got ",
                    first, " and ", last);
  if (rows > 0) {
    const at::Tensor drops = (crow.slice(0, 1) < crow.slice(0, 0, -1)).nonzero();
    if (drops.numel() > 0) {
      const int64_t r = drops[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, op, ": crow_indices decreases at row ", r, ": ", crow[r].item<int64_t>(), " -> ",
                        crow[r + 1].item<int64_t>());
    }
  }
  if (nnz == 0) return;
  // a bound beyond col's range cannot be exceeded (and must not wrap in the comparison)
  const int64_t col_max = col.scalar_type() == at::kShort ? INT16_MAX : INT32_MAX;
  const at::Tensor above = num_cols > col_max ? at::zeros_like(col, col.options().dtype(at::kBool)) : col >= num_cols;
  const at::Tensor bad = (col < 0).logical_or(above).nonzero();
  if (bad.numel() > 0) {
    const int64_t k = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": col_indices[", k, "] = ", col[k].item<int64_t>(), " is outside [0, ", num_cols,
                      ")");
  }
  if (nnz < 2) return;
  // nonzero k (k >= 1) must exceed its predecessor unless it starts a row
  at::Tensor starts = at::zeros({nnz}, col.options().dtype(at::kBool));
  const at::Tensor begins = crow.slice(0, 0, -1);
  starts.index_fill_(0, begins.masked_select(begins < crow.slice(0, 1)), true);
  const at::Tensor unsorted =
      (col.slice(0, 1) <= col.slice(0, 0, -1)).logical_and(starts.slice(0, 1).logical_not()).nonzero();
  if (unsorted.numel() > 0) {
    const int64_t k = unsorted[0][0].item<int64_t>() + 1;
    const int64_t r = at::searchsorted(crow, at::Scalar(k), false, true).item<int64_t>() - 1;
    TORCH_CHECK_VALUE(false, op, ": column indices of row ", r, " are not strictly increasing at nonzero ", k, ": ",
                      col[k - 1].item<int64_t>(), " then ", col[k].item<int64_t>());
  }
}

// O(rows): crow[0] == 0, crow never decreases, crow[rows] == nnz. After this every row's range lies in [0, nnz).
inline bool csr_pointers_valid(const int64_t* crow, int64_t rows, int64_t nnz) {
  if (crow[0] != 0 || crow[rows] != nnz) return false;
  for (int64_t r = 0; r < rows; ++r) {
    if (crow[r + 1] < crow[r]) return false;
  }
  return true;
}

// Nonzero when some col[k] <= col[k - 1] for k in (b, e).
template <typename I>
inline int csr_unsorted_generic(const I* col, int64_t b, int64_t e) {
  int unsorted = 0;  // an OR reduction the compiler vectorizes
  for (int64_t k = b + 1; k < e; ++k) unsorted |= col[k] <= col[k - 1];
  return unsorted;
}

#if defined(FEDSPA_CSR_CHECK_AVX2)
__attribute__((target("avx2"))) inline int csr_unsorted_avx2(const int32_t* col, int64_t b, int64_t e) {
  const __m256i ones = _mm256_set1_epi32(-1);
  __m256i bad = _mm256_setzero_si256();
  int64_t k = b + 1;
  for (; k + 8 <= e; k += 8) {  // eight (col[k - 1], col[k]) pairs per step: bad where not col[k] > col[k - 1]
    const __m256i cur = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
    const __m256i prev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k - 1));
    bad = _mm256_or_si256(bad, _mm256_xor_si256(_mm256_cmpgt_epi32(cur, prev), ones));
  }
  return (!_mm256_testz_si256(bad, bad)) | csr_unsorted_generic(col, k - 1, e);
}

__attribute__((target("avx2"))) inline int csr_unsorted_avx2(const int16_t* col, int64_t b, int64_t e) {
  const __m256i ones = _mm256_set1_epi16(-1);
  __m256i bad = _mm256_setzero_si256();
  int64_t k = b + 1;
  for (; k + 16 <= e; k += 16) {  // sixteen pairs per step
    const __m256i cur = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
    const __m256i prev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k - 1));
    bad = _mm256_or_si256(bad, _mm256_xor_si256(_mm256_cmpgt_epi16(cur, prev), ones));
  }
  return (!_mm256_testz_si256(bad, bad)) | csr_unsorted_generic(col, k - 1, e);
}
#endif

// Rows [r0, r1) (pointers already checked): columns strictly increasing within each row and in [0, num_cols).
template <typename I>
inline bool csr_rows_valid(const int64_t* crow, const I* col, int64_t r0, int64_t r1, int64_t num_cols) {
#if defined(FEDSPA_CSR_CHECK_AVX2)
  const bool avx2 = cpu_has_avx2_fma();
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = crow[r];
    const int64_t e = crow[r + 1];
    if (b == e) continue;
    if (col[b] < 0 || col[e - 1] >= num_cols) return false;
#if defined(FEDSPA_CSR_CHECK_AVX2)
    if (avx2 ? csr_unsorted_avx2(col, b, e) : csr_unsorted_generic(col, b, e)) return false;
#else
    if (csr_unsorted_generic(col, b, e)) return false;
#endif
  }
  return true;
}

// One parallel pass on the CPU: true when the pattern is valid. crow and col must be contiguous.
template <typename I>
inline bool csr_valid_cpu(const int64_t* crow, int64_t rows, const I* col, int64_t nnz, int64_t num_cols) {
  if (!csr_pointers_valid(crow, rows, nnz)) return false;
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) * std::max<int64_t>(rows, 1) / std::max<int64_t>(nnz, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (!csr_rows_valid(crow, col, r0, r1, num_cols)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// The check fused into a CPU kernel's first pass over its rows: the pointers are checked when this is built
// (O(rows)), each task checks its rows' columns right before it first reads through them (they are then in L1
// for the kernel; no extra pass over the pattern), and finish() raises the exact error if any row failed.
class FusedCsrCheck {
 public:
  FusedCsrCheck(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t num_cols)
      : op_(op), crow_(crow), col_(col), num_cols_(num_cols), crow_ptr_(crow.data_ptr<int64_t>()),
        col16_(col.scalar_type() == at::kShort ? col.data_ptr<int16_t>() : nullptr),
        col32_(col.scalar_type() == at::kShort ? nullptr : col.data_ptr<int32_t>()) {
    if (!csr_pointers_valid(crow_ptr_, crow.numel() - 1, col.numel())) raise();
  }

  // Rows [r0, r1) may be read through; false (remembered) when one of them is malformed: skip them.
  bool rows_ok(int64_t r0, int64_t r1) const {
#ifdef FEDSPA_BENCHMARK_UNCHECKED
    return true;
#endif
    if (col16_ ? csr_rows_valid(crow_ptr_, col16_, r0, r1, num_cols_)
               : csr_rows_valid(crow_ptr_, col32_, r0, r1, num_cols_)) {
      return true;
    }
    failed_.store(true, std::memory_order_relaxed);
    return false;
  }

  void finish() const {
    if (failed_.load()) raise();
  }

 private:
  [[noreturn]] void raise() const {
    check_csr_exact(op_, crow_, col_, num_cols_);
    TORCH_CHECK(false, op_, ": the CSR pattern failed the fast check but passed the exact one");
  }

  const char* op_;
  const at::Tensor& crow_;
  const at::Tensor& col_;
  int64_t num_cols_;
  const int64_t* crow_ptr_;
  const int16_t* col16_;  // the one of the two that col is; the other null
  const int32_t* col32_;
  mutable std::atomic<bool> failed_{false};
};

// Raises ValueError unless (crow, col) is a valid pattern with num_cols columns; crow and col contiguous.
inline void check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t num_cols) {
  if (crow.device().is_cpu() && dispatch_col_index(col, [&](auto index) {
        using I = decltype(index);
        return csr_valid_cpu(crow.data_ptr<int64_t>(), crow.numel() - 1, col.data_ptr<I>(), col.numel(), num_cols);
      })) {
    return;
  }
  check_csr_exact(op, crow, col, num_cols);
  TORCH_CHECK(!crow.device().is_cpu(), op, ": the CSR pattern failed the fast check but passed the exact one");
}

}  // namespace fedspa
