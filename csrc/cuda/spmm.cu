// CUDA kernel of fedspa::spmm: out (rows x N) = A (rows x cols, CSR) @ dense (cols x N); and fedspa::spmm_transposed
// (A^T @ dense), the same kernel over A's transposed order, built per call from the CSR pattern.
//
// A block computes a 128-wide slice of output columns for one row at a time (grid-stride over rows and
// column slices). The row's nonzeros are staged through shared memory 128 at a time; each thread then owns
// one output column and walks them, so consecutive threads read consecutive elements of each dense row
// (coalesced). Accumulates in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fedspa/csr_checks.h"
#include "fedspa/csr_transpose.h"

namespace fedspa {
namespace {

constexpr const char* kOp = "spmm";
constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void spmm_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ crow,
                            const index_t* __restrict__ col, const scalar_t* __restrict__ dense,
                            scalar_t* __restrict__ out, int64_t rows, int64_t n) {
  __shared__ int32_t s_col[kThreads];
  __shared__ acc_t s_val[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = crow[r];
    const int64_t e = crow[r + 1];
    for (int64_t j0 = static_cast<int64_t>(blockIdx.y) * kThreads; j0 < n; j0 += static_cast<int64_t>(gridDim.y) * kThreads) {
      const int64_t j = j0 + threadIdx.x;
      acc_t acc = 0;
      for (int64_t k0 = b; k0 < e; k0 += kThreads) {
        const int64_t k = k0 + threadIdx.x;
        if (k < e) {
          s_col[threadIdx.x] = col[k];
          s_val[threadIdx.x] = static_cast<acc_t>(values[k]);
        }
        __syncthreads();
        const int count = static_cast<int>(min(static_cast<int64_t>(kThreads), e - k0));
        if (j < n) {
          for (int t = 0; t < count; ++t) acc += s_val[t] * static_cast<acc_t>(dense[static_cast<int64_t>(s_col[t]) * n + j]);
        }
        __syncthreads();
      }
      if (j < n) out[r * n + j] = static_cast<scalar_t>(acc);
    }
  }
}

// dtypes, shapes and devices shared by spmm and spmm_transposed (dense has `inner` rows).
void check_spmm_operands(const char* op, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& dense, int64_t inner) {
  TORCH_CHECK_TYPE(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble ||
                                         values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16),
                   op, ": values must be a 1-D floating tensor, got ", values.scalar_type(), " of shape ",
                   values.sizes());
  TORCH_CHECK_VALUE(dense.dim() == 2, op, ": dense must be 2-D, got shape ", dense.sizes());
  TORCH_CHECK_TYPE(dense.scalar_type() == values.scalar_type(), op, ": dense is ", dense.scalar_type(),
                   " but values are ", values.scalar_type());
  TORCH_CHECK_VALUE(dense.device() == values.device(), op, ": dense is on ", dense.device(), " but values are on ",
                    values.device());
  check_csr_metadata(op, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), op, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  TORCH_CHECK_VALUE(inner < 0 || dense.size(0) == inner, op, ": the pattern needs ", inner,
                    " rows of dense, got shape ", dense.sizes());
}

// out (rows x n) = A @ dense for a checked pattern.
at::Tensor launch_spmm(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                       const at::Tensor& dense) {
  const at::Tensor values_c = values.contiguous();
  const at::Tensor dense_c = dense.contiguous();
  const int64_t rows = crow.numel() - 1;
  const int64_t n = dense.size(1);
  at::Tensor out = at::empty({rows, n}, dense.options());
  if (rows == 0 || n == 0) return out;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, int64_t{1} << 30)),
                  static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_col_index(col, [&](auto index) {
    using index_t = decltype(index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      spmm_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
          values_c.data_ptr<scalar_t>(), crow.data_ptr<int64_t>(), col.data_ptr<index_t>(),
          dense_c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor spmm_cuda(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& dense) {
  check_spmm_operands(kOp, values, crow, col, dense, -1);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(kOp, crow_c, col_c, dense.size(0));
  return launch_spmm(values, crow_c, col_c, dense);
}

// fedspa::spmm_transposed: out (cols x N) = A^T @ dense (rows x N), the same kernel over A's transposed order,
// built for the call from the checked CSR pattern (one stable sort: no layer keeps it). Untimed on a GPU.
at::Tensor spmm_transposed_cuda(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                                const at::Tensor& dense, int64_t cols) {
  constexpr const char* op = "spmm_transposed";
  TORCH_CHECK_VALUE(cols >= 0, op, ": cols must be >= 0, got ", cols);
  check_spmm_operands(op, values, crow, col, dense, crow.numel() - 1);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, cols);
  const auto [tcrow, tcol, tvalues] = csr_transpose_aten(values.contiguous(), crow_c, col_c, cols);
  return launch_spmm(tvalues, tcrow, tcol, dense);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_transposed", &spmm_transposed_cuda);
}

}  // namespace fedspa
