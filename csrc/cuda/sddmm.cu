// CUDA kernel of fedspa::sddmm: out[k] = dot(a[r_k, :], bt[c_k, :]) for every nonzero k of a CSR pattern.
//
// A block takes one row at a time (grid-stride); each of its warps takes every fourth nonzero of the row,
// its lanes stride over K (coalesced reads of both rows), and a shuffle reduction gives the dot product.
// Accumulates in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fedspa/csr_checks.h"

namespace fedspa {
namespace {

constexpr const char* kOp = "sddmm";
constexpr int kWarps = 4;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void sddmm_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ bt,
                             const int64_t* __restrict__ crow, const index_t* __restrict__ col,
                             scalar_t* __restrict__ out, int64_t rows, int64_t K) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* a_row = a + r * K;
    const int64_t e = crow[r + 1];
    for (int64_t k = crow[r] + warp; k < e; k += kWarps) {
      const scalar_t* b_row = bt + static_cast<int64_t>(col[k]) * K;
      acc_t sum = 0;
      for (int64_t j = lane; j < K; j += 32) sum += static_cast<acc_t>(a_row[j]) * static_cast<acc_t>(b_row[j]);
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
      if (lane == 0) out[k] = static_cast<scalar_t>(sum);
    }
  }
}

at::Tensor sddmm_cuda(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble || a.scalar_type() == at::kHalf ||
                       a.scalar_type() == at::kBFloat16,
                   kOp, ": a must be floating (fp16/bf16/fp32/fp64), got ", a.scalar_type());
  TORCH_CHECK_TYPE(bt.scalar_type() == a.scalar_type(), kOp, ": bt is ", bt.scalar_type(), " but a is ",
                   a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2 && bt.dim() == 2 && a.size(1) == bt.size(1), kOp,
                    ": a (rows x K) and bt (cols x K) must be 2-D with equal K, got ", a.sizes(), " and ", bt.sizes());
  TORCH_CHECK_VALUE(bt.device() == a.device(), kOp, ": bt is on ", bt.device(), " but a is on ", a.device());
  check_csr_metadata(kOp, crow, col, a.device());
  TORCH_CHECK_VALUE(crow.numel() == a.size(0) + 1, kOp, ": crow_indices has ", crow.numel(), " entries but a has ",
                    a.size(0), " rows");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(kOp, crow_c, col_c, bt.size(0));
  const at::Tensor a_c = a.contiguous();
  const at::Tensor bt_c = bt.contiguous();
  const int64_t rows = a.size(0);
  at::Tensor out = at::empty({col.numel()}, a.options());
  if (rows == 0 || col.numel() == 0) return out;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, int64_t{1} << 30));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_col_index(col_c, [&](auto index) {
    using index_t = decltype(index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      sddmm_kernel<scalar_t, acc_t, index_t><<<grid, kWarps * 32, 0, stream>>>(
          a_c.data_ptr<scalar_t>(), bt_c.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(), col_c.data_ptr<index_t>(),
          out.data_ptr<scalar_t>(), rows, a.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace fedspa
