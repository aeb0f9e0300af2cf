// CUDA kernels of fedspa::scatter_add_aggregate and fedspa::scatter_add_average.
//
// One launch covers all clients: blockIdx.y walks the clients, blockIdx.x/threadIdx.x their entries
// (grid-stride), and each valid entry does two atomicAdds into the (sum, coverage) arrays: one pass and no sort
// of the indices, rather than a sort-based segment reduction (the choice is not yet timed on a GPU). An entry
// with an index outside [0, n) is never written; the lowest such position per client is recorded with
// atomicMin, as is the lowest non-finite value, and the host raises a ValueError naming the client after the
// kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "fedspa/scatter_add_aggregate.h"

namespace fedspa {
namespace {

constexpr const char* kAggregateOp = "scatter_add_aggregate";
constexpr const char* kAverageOp = "scatter_add_average";
constexpr int kThreads = 256;
constexpr unsigned long long kNone = std::numeric_limits<unsigned long long>::max();

// One row per client in a device table: pointers to its indices and values, and its entry count.
struct ClientRow {
  const void* idx;
  const void* val;
  int64_t len;
};

template <typename index_t, typename value_t, typename acc_t>
__global__ void scatter_add_kernel(const ClientRow* __restrict__ clients, const acc_t* __restrict__ weights,
                                   int64_t num_clients, int64_t n, bool weighted_cov, acc_t* __restrict__ sum,
                                   acc_t* __restrict__ cov, unsigned long long* __restrict__ first_bad) {
  for (int64_t c = blockIdx.y; c < num_clients; c += gridDim.y) {
    const ClientRow row = clients[c];
    const index_t* __restrict__ idx = static_cast<const index_t*>(row.idx);
    const value_t* __restrict__ val = static_cast<const value_t*>(row.val);
    const acc_t w = weights[c];
    const acc_t cw = weighted_cov ? w : acc_t(1);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < row.len; k += stride) {
      const int64_t i = static_cast<int64_t>(idx[k]);
      const acc_t v = static_cast<acc_t>(val[k]);
      if (i < 0 || i >= n) {
        atomicMin(first_bad + 2 * c, static_cast<unsigned long long>(k));
        continue;
      }
      if (!isfinite(v)) atomicMin(first_bad + 2 * c + 1, static_cast<unsigned long long>(k));
      atomicAdd(sum + i, w * v);
      atomicAdd(cov + i, cw);
    }
  }
}

template <typename acc_t, typename out_t>
__global__ void masked_average_kernel(const acc_t* __restrict__ sum, const acc_t* __restrict__ cov,
                                      const out_t* __restrict__ prev, out_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t c = cov[i];
    out[i] = c > acc_t(0) ? static_cast<out_t>(sum[i] / c) : prev[i];
  }
}

// ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers that a minimal toolkit lacks; ask the runtime.
int num_sms(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

// Launches the scatter into zero-filled sum and cov, then raises on the first bad index / non-finite value.
void scatter_add_into(const char* op, const AggregateInputs& in, const at::Tensor& weights, int64_t n,
                      bool weighted_cov, at::Tensor& sum, at::Tensor& cov) {
  const int64_t num_clients = static_cast<int64_t>(in.indices.size());
  if (num_clients == 0) return;
  int64_t max_len = 0;
  at::Tensor table_cpu = at::empty({num_clients * static_cast<int64_t>(sizeof(ClientRow))}, at::kByte);
  auto* rows = reinterpret_cast<ClientRow*>(table_cpu.data_ptr<uint8_t>());
  for (int64_t c = 0; c < num_clients; ++c) {
    rows[c] = {in.indices[c].data_ptr(), in.values[c].data_ptr(), in.indices[c].numel()};
    max_len = std::max(max_len, in.indices[c].numel());
  }
  if (max_len == 0) return;
  const at::Tensor table = table_cpu.to(weights.device());
  at::Tensor first_bad = at::full({2 * num_clients}, -1, weights.options().dtype(at::kLong));

  const int64_t grid_y = std::min<int64_t>(num_clients, 65535);
  const int64_t blocks_wanted = std::max<int64_t>(1, (int64_t{num_sms(weights.device())} * 32) / grid_y);
  const int64_t grid_x = std::max<int64_t>(1, std::min<int64_t>((max_len + kThreads - 1) / kThreads, blocks_wanted));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INDEX_TYPES(in.index_dtype, "scatter_add_cuda", [&] {
    using idx_t = index_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value_dtype, "scatter_add_cuda", [&] {
      using val_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "scatter_add_cuda", [&] {
        scatter_add_kernel<idx_t, val_t, scalar_t><<<grid, kThreads, 0, stream>>>(
            reinterpret_cast<const ClientRow*>(table.data_ptr<uint8_t>()), weights.data_ptr<scalar_t>(),
            num_clients, n, weighted_cov, sum.data_ptr<scalar_t>(), cov.data_ptr<scalar_t>(),
            reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });

  const at::Tensor bad = first_bad.cpu();  // synchronizes: errors are reported by this call, not later
  const auto* b = reinterpret_cast<const unsigned long long*>(bad.data_ptr<int64_t>());
  for (int64_t c = 0; c < num_clients; ++c) {
    if (b[2 * c] != kNone) {
      const int64_t pos = static_cast<int64_t>(b[2 * c]);
      throw_bad_index(op, c, pos, in.indices[c][pos].item<int64_t>(), n);
    }
  }
  for (int64_t c = 0; c < num_clients; ++c) {
    if (b[2 * c + 1] != kNone) {
      const int64_t pos = static_cast<int64_t>(b[2 * c + 1]);
      throw_non_finite(op, c, pos, in.values[c][pos].item<double>());
    }
  }
}

std::tuple<at::Tensor, at::Tensor> scatter_add_aggregate_cuda(at::TensorList indices, at::TensorList values,
                                                              const at::Tensor& weights, int64_t n,
                                                              bool weighted_coverage) {
  const auto in = check_aggregate_inputs(kAggregateOp, indices, values, weights, n);
  const c10::cuda::CUDAGuard guard(weights.device());
  const at::Tensor w = weights.contiguous();
  check_weights_host(kAggregateOp, w.cpu());
  at::Tensor sum = at::zeros({n}, w.options());
  at::Tensor cov = at::zeros({n}, w.options());
  scatter_add_into(kAggregateOp, in, w, n, weighted_coverage, sum, cov);
  return {sum, cov};
}

at::Tensor scatter_add_average_cuda(at::TensorList indices, at::TensorList values, const at::Tensor& weights,
                                    const at::Tensor& previous) {
  const int64_t n = previous.numel();
  const auto in = check_aggregate_inputs(kAverageOp, indices, values, weights, n);
  check_previous(kAverageOp, previous, weights);
  const c10::cuda::CUDAGuard guard(weights.device());
  const at::Tensor w = weights.contiguous();
  check_weights_host(kAverageOp, w.cpu());
  at::Tensor sum = at::zeros({n}, w.options());
  at::Tensor cov = at::zeros({n}, w.options());
  scatter_add_into(kAverageOp, in, w, n, /*weighted_cov=*/true, sum, cov);
  const at::Tensor prev = previous.contiguous();
  at::Tensor out = at::empty_like(prev, at::MemoryFormat::Contiguous);
  if (n == 0) return out;
  const int64_t grid = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{num_sms(w.device())} * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "masked_average_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), "masked_average_cuda", [&] {
      masked_average_kernel<acc_t, scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          sum.data_ptr<acc_t>(), cov.data_ptr<acc_t>(), prev.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) {
  m.impl("scatter_add_aggregate", &scatter_add_aggregate_cuda);
  m.impl("scatter_add_average", &scatter_add_average_cuda);
}

}  // namespace fedspa
