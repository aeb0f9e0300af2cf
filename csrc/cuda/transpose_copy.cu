// CUDA kernel of fedspa::transpose_copy: out (cols x rows, row-major) = x.t() for a 2-D x (rows x cols).
//
// The classic shared-memory transpose: a block of 32 x 8 threads moves a 32 x 32 tile, reading rows of x and
// writing rows of out with coalesced accesses (the tile padded to 33 columns, so the transposed read of shared
// memory has no bank conflicts). blockIdx.x walks column tiles of x, blockIdx.y row tiles (grid-stride: any number of
// rows). Not yet run on a GPU: compiled and linked in CI only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fedspa {
namespace {

constexpr const char* kOp = "transpose_copy";
constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;

template <typename scalar_t>
__global__ void transpose_copy_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows,
                                      int64_t cols, int64_t row_tiles) {
  __shared__ scalar_t tile[kTile][kTile + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kTile;
    for (int i = threadIdx.y; i < kTile; i += kRowsPerPass) {
      const int64_t r = r0 + i;
      const int64_t c = c0 + threadIdx.x;
      if (r < rows && c < cols) tile[i][threadIdx.x] = x[r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < kTile; i += kRowsPerPass) {
      const int64_t c = c0 + i;  // a row of out
      const int64_t r = r0 + threadIdx.x;
      if (c < cols && r < rows) out[c * rows + r] = tile[threadIdx.x][i];
    }
    __syncthreads();
  }
}

at::Tensor transpose_copy_cuda(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, kOp, ": x must be 2-D, got ", x_in.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), kOp, ": x must be a floating-point tensor, got ",
                   x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  at::Tensor out = at::empty({cols, rows}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  TORCH_CHECK_VALUE(col_tiles <= 2147483647, kOp, ": x has ", cols, " columns, more than one launch covers");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(std::min<int64_t>(row_tiles, 65535)));
  const dim3 block(kTile, kRowsPerPass);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    transpose_copy_kernel<scalar_t><<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                 rows, cols, row_tiles);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) { m.impl("transpose_copy", &transpose_copy_cuda); }

}  // namespace fedspa
