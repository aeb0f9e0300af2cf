// CUDA kernels of the direct sparse convolution (fedspa::sparse_conv2d, sparse_conv2d_input_grad,
// sparse_conv2d_weight_grad).
//
// Activations are (C, H, W, N): consecutive threads own consecutive batch elements of a position, so every tap
// read is coalesced along the batch.
// - forward: blockIdx.y is an output channel; its nonzeros are decoded into taps (value, input offset, ky, kx)
//   and staged through shared memory kThreads at a time; each thread owns one (position, batch) output element
//   (grid-stride) and walks the taps, skipping those that land in the zero padding.
// - input gradient: blockIdx.y is an input channel; for each kernel tap (ky, kx) the entries of the weight's column
//   (c, ky, kx) (output channel, value), from its transposed order built per call with one stable sort of the CSR
//   columns (csr_transpose_aten: no layer keeps it), are staged the same way; each thread owns one input element and
//   reads grad_out at the output position its tap maps to, if there is one.
// - weight gradient: a block per nonzero (grid-stride); its threads sum grad_out x input products over the
//   positions where the tap lands inside the input and the batch, then reduce in shared memory.
// Accumulates in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fedspa/conv_geometry.h"
#include "fedspa/csr_checks.h"
#include "fedspa/csr_transpose.h"

namespace fedspa {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksX = 65535;

struct DeviceGeometry {
  int64_t C, H, W, N, O, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;
};

DeviceGeometry to_device(const ConvGeometry& g) {
  return {g.C, g.H, g.W, g.N, g.O, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw};
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ crow,
                               const index_t* __restrict__ col, const scalar_t* __restrict__ in,
                               scalar_t* __restrict__ out, DeviceGeometry g) {
  __shared__ acc_t s_w[kThreads];
  __shared__ int64_t s_base[kThreads];  // input offset (in positions) of the tap at output (0, 0), before padding
  __shared__ int32_t s_dy[kThreads];
  __shared__ int32_t s_dx[kThreads];
  const int64_t o = blockIdx.y;
  const int64_t b = crow[o];
  const int64_t e = crow[o + 1];
  const int64_t elements = g.OH * g.OW * g.N;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads; first < elements;
       first += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t idx = first + threadIdx.x;
    const bool live = idx < elements;
    const int64_t n = idx % g.N;
    const int64_t pos = idx / g.N;
    const int64_t y0 = (pos / g.OW) * g.sh - g.ph;
    const int64_t x0 = (pos % g.OW) * g.sw - g.pw;
    acc_t acc = 0;
    for (int64_t k0 = b; k0 < e; k0 += kThreads) {
      const int64_t k = k0 + threadIdx.x;
      if (k < e) {
        const int64_t j = col[k];
        const int64_t c = j / (g.kh * g.kw);
        const int64_t r = j % (g.kh * g.kw);
        s_w[threadIdx.x] = static_cast<acc_t>(values[k]);
        s_dy[threadIdx.x] = static_cast<int32_t>((r / g.kw) * g.dh);
        s_dx[threadIdx.x] = static_cast<int32_t>((r % g.kw) * g.dw);
        s_base[threadIdx.x] = c * g.H * g.W;
      }
      __syncthreads();
      const int count = static_cast<int>(min(static_cast<int64_t>(kThreads), e - k0));
      if (live) {
        for (int t = 0; t < count; ++t) {
          const int64_t iy = y0 + s_dy[t];
          const int64_t ix = x0 + s_dx[t];
          if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
            acc += s_w[t] * static_cast<acc_t>(in[(s_base[t] + iy * g.W + ix) * g.N + n]);
          }
        }
      }
      __syncthreads();
    }
    if (live) out[o * elements + idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const scalar_t* __restrict__ values_t, const int64_t* __restrict__ tcrow,
                                  const int32_t* __restrict__ tcol, const scalar_t* __restrict__ gout,
                                  scalar_t* __restrict__ gin, DeviceGeometry g) {
  __shared__ acc_t s_w[kThreads];
  __shared__ int32_t s_o[kThreads];
  const int64_t c = blockIdx.y;
  const int64_t elements = g.H * g.W * g.N;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads; first < elements;
       first += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t idx = first + threadIdx.x;
    const bool live = idx < elements;
    const int64_t n = idx % g.N;
    const int64_t pos = idx / g.N;
    const int64_t iy = pos / g.W;
    const int64_t ix = pos % g.W;
    acc_t acc = 0;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t ty = iy + g.ph - ky * g.dh;
      const int64_t oy = ty / g.sh;
      const bool y_ok = ty >= 0 && ty % g.sh == 0 && oy < g.OH;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t tx = ix + g.pw - kx * g.dw;
        const int64_t ox = tx / g.sw;
        const bool ok = live && y_ok && tx >= 0 && tx % g.sw == 0 && ox < g.OW;
        const int64_t j = (c * g.kh + ky) * g.kw + kx;
        const int64_t b = tcrow[j];
        const int64_t e = tcrow[j + 1];
        for (int64_t t0 = b; t0 < e; t0 += kThreads) {
          const int64_t t = t0 + threadIdx.x;
          if (t < e) {
            s_w[threadIdx.x] = static_cast<acc_t>(values_t[t]);
            s_o[threadIdx.x] = tcol[t];
          }
          __syncthreads();
          const int count = static_cast<int>(min(static_cast<int64_t>(kThreads), e - t0));
          if (ok) {
            const int64_t offset = (oy * g.OW + ox) * g.N + n;
            for (int u = 0; u < count; ++u) {
              acc += s_w[u] * static_cast<acc_t>(gout[static_cast<int64_t>(s_o[u]) * g.OH * g.OW * g.N + offset]);
            }
          }
          __syncthreads();
        }
      }
    }
    if (live) gin[c * elements + idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ in,
                                   const int64_t* __restrict__ rows, const index_t* __restrict__ col,
                                   scalar_t* __restrict__ out, int64_t nnz, DeviceGeometry g) {
  __shared__ acc_t s_sum[kThreads];
  const int64_t elements = g.OH * g.OW * g.N;
  for (int64_t k = blockIdx.x; k < nnz; k += gridDim.x) {
    const int64_t o = rows[k];
    const int64_t j = col[k];
    const int64_t c = j / (g.kh * g.kw);
    const int64_t r = j % (g.kh * g.kw);
    const int64_t dy = (r / g.kw) * g.dh - g.ph;
    const int64_t dx = (r % g.kw) * g.dw - g.pw;
    acc_t acc = 0;
    for (int64_t idx = threadIdx.x; idx < elements; idx += kThreads) {
      const int64_t n = idx % g.N;
      const int64_t pos = idx / g.N;
      const int64_t iy = (pos / g.OW) * g.sh + dy;
      const int64_t ix = (pos % g.OW) * g.sw + dx;
      if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
        acc += static_cast<acc_t>(gout[o * elements + idx]) *
               static_cast<acc_t>(in[((c * g.H + iy) * g.W + ix) * g.N + n]);
      }
    }
    s_sum[threadIdx.x] = acc;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[k] = static_cast<scalar_t>(s_sum[0]);
    __syncthreads();
  }
}

unsigned blocks_for(int64_t elements) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((elements + kThreads - 1) / kThreads,
                                                                      kMaxBlocksX)));
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& input_t, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d";
  check_conv_values(op, values, true);
  check_conv_activation(op, "input_t", input_t, values);
  check_csr_metadata(op, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), op, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  const ConvGeometry g = make_conv_geometry(op, input_t.size(0), input_t.size(1), input_t.size(2), input_t.size(3),
                                            crow.numel() - 1, kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(g.O <= 65535, op, ": at most 65535 output channels on CUDA, got ", g.O);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  at::Tensor out = at::empty({g.O, g.OH, g.OW, g.N}, input_t.options());
  if (out.numel() == 0) return out;
  const at::Tensor v = values.contiguous();
  const at::Tensor in = input_t.contiguous();
  const dim3 grid(blocks_for(g.OH * g.OW * g.N), static_cast<unsigned>(g.O));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_col_index(col_c, [&](auto index) {
    using index_t = decltype(index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      forward_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
          v.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(), col_c.data_ptr<index_t>(), in.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), to_device(g));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor sparse_conv2d_input_grad_cuda(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                                         const at::Tensor& grad_out_t, at::IntArrayRef input_chw,
                                         at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d_input_grad";
  check_conv_values(op, values, true);
  check_conv_activation(op, "grad_out_t", grad_out_t, values);
  check_csr_metadata(op, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), op, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  const ConvGeometry g = input_grad_geometry(op, crow, grad_out_t, input_chw, kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(g.C <= 65535, op, ": at most 65535 input channels on CUDA, got ", g.C);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  at::Tensor gin = at::empty({g.C, g.H, g.W, g.N}, grad_out_t.options());
  if (gin.numel() == 0) return gin;
  // the kernel reads the weight column by column: its transposed order, built for this call from the checked CSR
  const auto [tcrow, tcol, tvalues] = csr_transpose_aten(values.contiguous(), crow_c, col_c, g.C * g.kh * g.kw);
  const at::Tensor gout = grad_out_t.contiguous();
  const dim3 grid(blocks_for(g.H * g.W * g.N), static_cast<unsigned>(g.C));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_input_grad_cuda",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    input_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        tvalues.data_ptr<scalar_t>(), tcrow.data_ptr<int64_t>(), tcol.data_ptr<int32_t>(), gout.data_ptr<scalar_t>(),
        gin.data_ptr<scalar_t>(), to_device(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gin;
}

at::Tensor sparse_conv2d_weight_grad_cuda(const at::Tensor& grad_out_t, const at::Tensor& input_t,
                                          const at::Tensor& crow, const at::Tensor& col, at::IntArrayRef kernel,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d_weight_grad";
  const auto dtype = input_t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": input_t must be floating, got ", dtype);
  check_conv_activation(op, "input_t", input_t, input_t);
  check_conv_activation(op, "grad_out_t", grad_out_t, input_t);
  check_csr_metadata(op, crow, col, input_t.device());
  const ConvGeometry g = make_conv_geometry(op, input_t.size(0), input_t.size(1), input_t.size(2), input_t.size(3),
                                            crow.numel() - 1, kernel, stride, padding, dilation);
  check_weight_grad_shape(op, grad_out_t, g);
  const c10::cuda::CUDAGuard guard(input_t.device());
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  const int64_t nnz = col.numel();
  at::Tensor out = at::empty({nnz}, input_t.options());
  if (nnz == 0) return out;
  const at::Tensor gout = grad_out_t.contiguous();
  const at::Tensor in = input_t.contiguous();
  const at::Tensor counts = crow_c.slice(0, 1) - crow_c.slice(0, 0, -1);
  const at::Tensor rows = at::repeat_interleave(at::arange(g.O, crow.options()), counts, /*dim=*/0, /*output_size=*/nnz);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(nnz, int64_t{1} << 30));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_col_index(col_c, [&](auto index) {
    using index_t = decltype(index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_conv2d_weight_grad_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      weight_grad_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
          gout.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), col_c.data_ptr<index_t>(),
          out.data_ptr<scalar_t>(), nnz, to_device(g));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_input_grad", &sparse_conv2d_input_grad_cuda);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cuda);
}

}  // namespace fedspa
