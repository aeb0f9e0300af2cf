// The transposed (CSC) order of a CSR pattern, built on the CPU inside a kernel that reads its matrix column by
// column, so that no layer has to keep a transposed copy of its pattern between steps.
//
// One counting sort, O(nnz + cols): the rows are cut into one chunk per thread, each chunk counts its columns, a
// prefix sum over (column, chunk) gives every chunk its place within each column, and each chunk writes its
// entries there. Rows stay ascending within a column. The pattern must have been checked (check_csr) first.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

namespace fedspa {

template <typename T>
struct CscOf {
  std::vector<int64_t> ccol;        // cols + 1 column pointers
  std::unique_ptr<int32_t[]> row;   // the row of each entry, column by column (every entry written below)
  std::unique_ptr<T[]> values;      // the values in the same order
};

template <typename T, typename I>
CscOf<T> csr_transpose_cpu(const T* values, const int64_t* crow, const I* col, int64_t rows, int64_t cols) {
  CscOf<T> t;
  const int64_t nnz = crow[rows];
  t.ccol.assign(cols + 1, 0);
  t.row.reset(new int32_t[nnz]);  // uninitialized: the scatter below writes every entry once
  t.values.reset(new T[nnz]);
  if (nnz == 0 || cols == 0) return t;
  // small patterns: one chunk (a thread's counts would cost more than the sort)
  const int64_t chunks = std::clamp<int64_t>(nnz / (int64_t{1} << 16), 1, std::max(1, at::get_num_threads()));
  std::vector<int64_t> bounds(chunks + 1, rows);
  for (int64_t c = 0; c < chunks; ++c) {  // chunks of about nnz / chunks entries
    const int64_t target = nnz * c / chunks;
    bounds[c] = std::upper_bound(crow, crow + rows + 1, target) - crow - 1;
  }
  bounds[0] = 0;
  std::vector<int64_t> counts(chunks * cols, 0);  // counts[chunk * cols + column]
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* mine = counts.data() + c * cols;
      for (int64_t k = crow[bounds[c]]; k < crow[bounds[c + 1]]; ++k) ++mine[col[k]];
    }
  });
  int64_t running = 0;  // exclusive prefix in (column, chunk) order: chunk c's entries of column j start here
  for (int64_t j = 0; j < cols; ++j) {
    t.ccol[j] = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = counts[c * cols + j];
      counts[c * cols + j] = running;
      running += n;
    }
  }
  t.ccol[cols] = running;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * cols;
      for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
        for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
          const int64_t at = next[col[k]]++;
          t.row[at] = static_cast<int32_t>(r);
          t.values[at] = values[k];
        }
      }
    }
  });
  return t;
}

// The same with ATen ops on the pattern's own device (the CUDA kernels): (ccol int64 of cols + 1, row int32, values)
// from one stable sort of the columns. Untimed on a GPU.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_aten(const at::Tensor& values,
                                                                         const at::Tensor& crow,
                                                                         const at::Tensor& col, int64_t cols) {
  const int64_t nnz = col.numel();
  at::Tensor ccol = at::zeros({cols + 1}, crow.options());
  if (nnz == 0) return {ccol, at::empty({0}, col.options().dtype(at::kInt)), values.new_empty({0})};
  const at::Tensor perm = at::argsort(col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor rows = at::searchsorted(crow, at::arange(nnz, crow.options()), /*out_int32=*/false,
                                           /*right=*/true) - 1;
  ccol.slice(0, 1).copy_(at::cumsum(at::bincount(col, {}, cols), 0));
  return {ccol, rows.index_select(0, perm).to(at::kInt), values.index_select(0, perm)};
}

}  // namespace fedspa
