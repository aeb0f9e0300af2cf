// Geometry and operand checks of the direct sparse convolution (fedspa::spconv2d*), shared by the CPU and CUDA
// kernels, with the messages of the Python references (fedspa_kernels/ops/sparse_conv2d.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fedspa {

struct ConvGeometry {
  int64_t C, H, W, N;  // input (C, H, W, N)
  int64_t O, OH, OW;   // output (O, OH, OW, N)
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_ld;      // elements between two positions of the tensor a kernel writes: N, unless the kernel runs on
                       // a batch chunk and writes into the chunk's slice of a wider tensor
};

inline ConvGeometry make_conv_geometry(const char* op, int64_t channels, int64_t height, int64_t width,
                                       int64_t batch, int64_t out_channels, at::IntArrayRef kernel,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": kernel_size, stride, padding and dilation must each be two integers, got ", kernel, ", ", stride,
                    ", ", padding, ", ", dilation);
  TORCH_CHECK_VALUE(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                        padding[1] >= 0 && dilation[0] >= 1 && dilation[1] >= 1,
                    op, ": kernel_size, stride and dilation must be >= 1 and padding >= 0, got ", kernel, ", ",
                    stride, ", ", padding, ", ", dilation);
  ConvGeometry g{channels, height, width, batch, out_channels, 0, 0, kernel[0], kernel[1], stride[0], stride[1],
                 padding[0], padding[1], dilation[0], dilation[1]};
  g.OH = (height + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (width + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.out_ld = batch;
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && g.OH >= 1 && g.OW >= 1, op, ": input of ", height, "x", width,
                    " gives an empty output with kernel ", kernel, ", stride ", stride, ", padding ", padding,
                    ", dilation ", dilation);
  return g;
}

inline void check_conv_values(const char* op, const at::Tensor& values, bool allow_half) {
  const auto t = values.scalar_type();
  const bool ok = t == at::kFloat || t == at::kDouble || (allow_half && (t == at::kHalf || t == at::kBFloat16));
  TORCH_CHECK_TYPE(values.dim() == 1 && ok, op, ": values must be a 1-D ",
                   allow_half ? "floating" : "float32 or float64", " tensor, got ", t, " of shape ", values.sizes());
}

inline void check_conv_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D (C, H, W, N), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
                   " but the weights are ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the weights are on ",
                    like.device());
}

// The geometry of sparse_conv2d_input_grad: the input's (C, H, W) as given, the output channels from the pattern's
// rows, both checked against grad_out_t.
inline ConvGeometry input_grad_geometry(const char* op, const at::Tensor& crow, const at::Tensor& grad_out_t,
                                        at::IntArrayRef input_chw, at::IntArrayRef kernel, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(input_chw.size() == 3 && input_chw[0] >= 0, op,
                    ": input_chw must be three integers (channels, height, width), got ", input_chw);
  TORCH_CHECK_VALUE(crow.numel() - 1 == grad_out_t.size(0), op, ": the pattern has ", crow.numel() - 1,
                    " rows (output channels) but grad_out_t is ", grad_out_t.sizes());
  const ConvGeometry g = make_conv_geometry(op, input_chw[0], input_chw[1], input_chw[2], grad_out_t.size(3),
                                            grad_out_t.size(0), kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(grad_out_t.size(1) == g.OH && grad_out_t.size(2) == g.OW, op, ": grad_out_t is ",
                    grad_out_t.sizes(), " but an input of [", g.H, ", ", g.W, "] gives ", g.OH, "x", g.OW, " outputs");
  return g;
}

inline void check_weight_grad_shape(const char* op, const at::Tensor& grad_out_t, const ConvGeometry& g) {
  TORCH_CHECK_VALUE(grad_out_t.size(0) == g.O && grad_out_t.size(1) == g.OH && grad_out_t.size(2) == g.OW &&
                        grad_out_t.size(3) == g.N,
                    op, ": grad_out_t is ", grad_out_t.sizes(), ", expected [", g.O, ", ", g.OH, ", ", g.OW, ", ",
                    g.N, "]");
}

}  // namespace fedspa
