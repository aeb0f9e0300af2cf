"""Direct sparse 2-D convolution (no im2col), with autograd.

The weight is a SparseMatrix W of shape (out_channels, in_channels * kh * kw) (the dense weight flattened per
output channel, column j = (c * kh + ky) * kw + kx); activations are feature-major, ``(C, H, W, N)`` with the
batch last, so that every nonzero weight at every output position reads a contiguous batch vector: the
convolution is an SpMM whose dense operand (the unfolded input) is never materialized. Three kernel ops, each
with a reference (below), C++ CPU, CUDA and Triton kernels:

    fedspa::sparse_conv2d(values, crow, col, input_t, kernel, stride, padding, dilation) -> out_t (O, H', W', N)
    fedspa::sparse_conv2d_input_grad(values, crow, col, grad_out_t, input_chw, kernel, stride, padding, dilation)
        -> grad_input_t (C, H, W, N)
    fedspa::sparse_conv2d_weight_grad(grad_out_t, input_t, crow, col, kernel, stride, padding, dilation)
        -> grad_values (nnz, CSR order)

and the differentiable ``fedspa::sparse_conv2d_autograd``. Every op takes W in its CSR order only: the input
gradient's kernels, which read W column by column, build its transposed order for the call (a counting sort on the
CPU, a stable sort on a GPU: O(nnz) beside the O(nnz x positions x batch) product), so no layer keeps a transposed
copy of its pattern. Zero padding. Only stored
weights multiply (a NaN or Inf input reaches exactly the outputs of the taps that read it). Double backward is
not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import resolve_backend
from .._checks import (check_conv_forward_inputs, check_conv_input_grad_inputs, check_conv_weight_grad_inputs,
                       output_hw, row_of_each_nonzero)
from .._op import KernelOp, autograd_op
from ..sparse_matrix import SparseMatrix
from .transpose_copy import batch_last, nchw_contiguous

_CHUNK_ELEMENTS = 1 << 22  # the references' temporaries: at most this many products at a time
_GEOMETRY = "int[] kernel_size, int[] stride, int[] padding, int[] dilation"


# ------------------------------------------------------------------------------------------------------------------
# References: per kernel tap, the stored weights times the shifted (zero-padded) input, added up (the oracle)
# ------------------------------------------------------------------------------------------------------------------
def _taps(crow, col, kernel_size):
    """Per nonzero: its row, its input channel and its tap (ky * kw + kx)."""
    taps = kernel_size[0] * kernel_size[1]
    col = col.long()
    return row_of_each_nonzero(crow), col // taps, col % taps


def _window(padded, ky, kx, out_hw, stride, dilation):
    """The padded input's (C, H', W', N) view that tap (ky, kx) reads for every output position."""
    y0, x0 = ky * dilation[0], kx * dilation[1]
    return padded[:, y0:y0 + stride[0] * (out_hw[0] - 1) + 1:stride[0],
                  x0:x0 + stride[1] * (out_hw[1] - 1) + 1:stride[1]]


def _chunks(count: int, per_item: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_item, 1))
    return range(0, count, step), step


def _accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_conv2d_reference(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation):
    """Pure-PyTorch fedspa::sparse_conv2d."""
    out_h, out_w = check_conv_forward_inputs("sparse_conv2d", values, crow_indices, col_indices, input_t,
                                             kernel_size, stride, padding, dilation)
    acc = _accumulation(values.dtype)
    _, _, _, batch = input_t.shape
    padded = F.pad(input_t.to(acc), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    out = torch.zeros(crow_indices.numel() - 1, out_h, out_w, batch, dtype=acc, device=values.device)
    rows, channels, taps = _taps(crow_indices, col_indices, kernel_size)
    v = values.to(acc)
    for tap in range(kernel_size[0] * kernel_size[1]):
        at = (taps == tap).nonzero().squeeze(1)
        window = _window(padded, tap // kernel_size[1], tap % kernel_size[1], (out_h, out_w), stride, dilation)
        starts, step = _chunks(at.numel(), out_h * out_w * batch)
        for s in starts:
            k = at[s:s + step]
            out.index_add_(0, rows[k], v[k, None, None, None] * window[channels[k]])
    return out.to(values.dtype)


def sparse_conv2d_input_grad_reference(values, crow_indices, col_indices, grad_out_t, input_chw, kernel_size, stride,
                                       padding, dilation):
    """Pure-PyTorch fedspa::sparse_conv2d_input_grad: per kernel tap, each stored weight times its output channel's
    gradient, added into its input channel's (shifted) window."""
    check_conv_input_grad_inputs("sparse_conv2d_input_grad", values, crow_indices, col_indices, grad_out_t,
                                 input_chw, kernel_size, stride, padding, dilation)
    acc = _accumulation(values.dtype)
    _, out_h, out_w, batch = grad_out_t.shape
    in_channels, height, width = input_chw
    padded = torch.zeros(in_channels, height + 2 * padding[0], width + 2 * padding[1], batch, dtype=acc,
                         device=values.device)
    outs, channels, taps = _taps(crow_indices, col_indices, kernel_size)
    grad = grad_out_t.to(acc)
    v = values.to(acc)
    for tap in range(kernel_size[0] * kernel_size[1]):
        at = (taps == tap).nonzero().squeeze(1)
        contribution = torch.zeros(in_channels, out_h, out_w, batch, dtype=acc, device=values.device)
        starts, step = _chunks(at.numel(), out_h * out_w * batch)
        for s in starts:
            k = at[s:s + step]
            contribution.index_add_(0, channels[k], v[k, None, None, None] * grad[outs[k]])
        _window(padded, tap // kernel_size[1], tap % kernel_size[1], (out_h, out_w), stride, dilation).add_(
            contribution)
    grad_input = padded[:, padding[0]:padding[0] + height, padding[1]:padding[1] + width]
    return grad_input.contiguous().to(values.dtype)


def sparse_conv2d_weight_grad_reference(grad_out_t, input_t, crow_indices, col_indices, kernel_size, stride, padding,
                                        dilation):
    """Pure-PyTorch fedspa::sparse_conv2d_weight_grad: per nonzero, the sum of grad_out x the input it read."""
    check_conv_weight_grad_inputs("sparse_conv2d_weight_grad", grad_out_t, input_t, crow_indices, col_indices,
                                  kernel_size, stride, padding, dilation)
    acc = _accumulation(input_t.dtype)
    _, out_h, out_w, batch = grad_out_t.shape
    padded = F.pad(input_t.to(acc), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    grad = grad_out_t.to(acc)
    out = torch.zeros(col_indices.numel(), dtype=acc, device=input_t.device)
    rows, channels, taps = _taps(crow_indices, col_indices, kernel_size)
    for tap in range(kernel_size[0] * kernel_size[1]):
        at = (taps == tap).nonzero().squeeze(1)
        window = _window(padded, tap // kernel_size[1], tap % kernel_size[1], (out_h, out_w), stride, dilation)
        starts, step = _chunks(at.numel(), out_h * out_w * batch)
        for s in starts:
            k = at[s:s + step]
            out[k] = (grad[rows[k]] * window[channels[k]]).sum(dim=(1, 2, 3))
    return out.to(input_t.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Fakes, FLOPs, the kernel ops
# ------------------------------------------------------------------------------------------------------------------
def _forward_fake(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation):
    out_h, out_w = output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation)
    return input_t.new_empty(crow_indices.shape[0] - 1, out_h, out_w, input_t.shape[3])


def _input_grad_fake(values, crow_indices, col_indices, grad_out_t, input_chw, kernel_size, stride, padding, dilation):
    return grad_out_t.new_empty(input_chw[0], input_chw[1], input_chw[2], grad_out_t.shape[3])


def _weight_grad_fake(grad_out_t, input_t, crow_indices, col_indices, kernel_size, stride, padding, dilation):
    return input_t.new_empty(col_indices.shape[0])


def _conv_flops(nnz: int, grad_out_shape) -> int:
    """2 x nnz x output positions x batch: one multiply-add per nonzero weight per output pixel."""
    return 2 * nnz * grad_out_shape[1] * grad_out_shape[2] * grad_out_shape[3]


_TRITON = "fedspa_kernels.triton_kernels.sparse_conv2d"
SPARSE_CONV2D = KernelOp(
    "sparse_conv2d",
    f"(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor input_t, {_GEOMETRY}) -> Tensor",
    reference=sparse_conv2d_reference, fake=_forward_fake, triton=f"{_TRITON}:sparse_conv2d_triton",
    flops=lambda values, *args, out_shape=None, **kwargs: _conv_flops(values[0], out_shape))
SPARSE_CONV2D_INPUT_GRAD = KernelOp(
    "sparse_conv2d_input_grad",
    f"(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor grad_out_t, int[] input_chw, "
    f"{_GEOMETRY}) -> Tensor",
    reference=sparse_conv2d_input_grad_reference, fake=_input_grad_fake,
    triton=f"{_TRITON}:sparse_conv2d_input_grad_triton",
    flops=lambda values, crow, col, grad_out, *args, out_shape=None, **kwargs: _conv_flops(values[0], grad_out))
SPARSE_CONV2D_WEIGHT_GRAD = KernelOp(
    "sparse_conv2d_weight_grad",
    f"(Tensor grad_out_t, Tensor input_t, Tensor crow_indices, Tensor col_indices, {_GEOMETRY}) -> Tensor",
    reference=sparse_conv2d_weight_grad_reference, fake=_weight_grad_fake,
    triton=f"{_TRITON}:sparse_conv2d_weight_grad_triton",
    flops=lambda grad_out, *args, out_shape=None, **kwargs: _conv_flops(out_shape[0], grad_out))


# ------------------------------------------------------------------------------------------------------------------
# The differentiable op
# ------------------------------------------------------------------------------------------------------------------
def _sparse_conv2d_autograd(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation,
                            backend):
    if backend not in ("cpp", "cuda"):
        input_t = input_t.contiguous()  # native kernels make their own (parallel) copies
    return SPARSE_CONV2D.kernel(backend)(values, crow_indices, col_indices, input_t, kernel_size, stride, padding,
                                         dilation)


def _autograd_fake(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation, backend):
    return _forward_fake(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation)


def _setup_context(ctx, inputs, output):
    values, crow, col, input_t, kernel_size, stride, padding, dilation, backend = inputs
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation))
    ctx.input_chw = list(input_t.shape[:3])
    ctx.backend = backend
    ctx.save_for_backward(values if ctx.needs_input_grad[3] else None, input_t if ctx.needs_input_grad[0] else None,
                          crow, col)


class _GradientInNCHW(torch.autograd.Function):
    """Identity on an NCHW tensor whose gradient arrives in (C, H, W, N): the gradient is made NCHW by one tiled
    transpose."""

    @staticmethod
    def forward(x: torch.Tensor, backend: str) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.backend = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return nchw_contiguous(grad, ctx.backend), None


class _OutputInNCHW(torch.autograd.Function):
    """A (C, H, W, N) output as a contiguous NCHW tensor (one tiled transpose); its gradient goes back as it comes
    (the backward reads an NCHW gradient as it is)."""

    @staticmethod
    def forward(out_t: torch.Tensor, backend: str) -> torch.Tensor:
        return nchw_contiguous(out_t.permute(3, 0, 1, 2), backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.permute(1, 2, 3, 0), None


class _Subsample(torch.autograd.Function):
    """Every stride-th row and column of a tensor's two spatial dims (from `dim`), copied contiguous; the gradient
    goes back into one zeroed tensor of the input's shape (indexing's two slices would zero and copy twice)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, stride: list[int]) -> torch.Tensor:
        # always a copy: a 1x1 subsample is contiguous already, and a view of the input must not leave the Function
        return x[_spatial_slices(dim, stride)].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.dim, ctx.stride = inputs
        ctx.shape = x.shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_input = grad.new_zeros(ctx.shape)
        grad_input[_spatial_slices(ctx.dim, ctx.stride)] = grad
        return grad_input, None, None


def _spatial_slices(dim: int, stride: list[int]) -> tuple:
    return (slice(None),) * dim + (slice(None, None, stride[0]), slice(None, None, stride[1]))


# The C++ kernels run an fp32 batch wider than this as contiguous (C, H, W, 64) chunks, each transposed straight from
# an NCHW view (csrc/cpu/sparse_conv2d.cpp).
_CPP_BATCH_CHUNK = 64


def _nchw_memory(t: torch.Tensor) -> bool:
    """Is the (C, H, W, N) tensor `t` a view of a contiguous (N, C, H, W) one?"""
    return t.permute(3, 0, 1, 2).is_contiguous() and not t.is_contiguous()


def _backward_in_nchw_chunks(ctx, grad, values, input_t, crow, col):
    """Both gradients of an NCHW caller's wide fp32 batch, 64-wide chunk by chunk: each chunk of the output gradient
    is transposed once for both kernels (called on the whole, each kernel transposes every chunk itself), and each
    chunk of the input gradient goes into one NCHW tensor (a whole (C, H, W, N) gradient is one more activation-sized
    allocation, which glibc maps afresh above 32 MB, and one more transpose). ResNet-18 stage 1 at batch 128,
    d = 0.05, the training step, five alternating runs: 1 thread 119-127 ms (was 143-184), 2 threads 68-93 (was
    81-100)."""
    grad_nchw, input_nchw = grad.permute(3, 0, 1, 2), input_t.permute(3, 0, 1, 2)
    batch = grad.shape[3]
    grad_input = grad.new_empty(batch, *ctx.input_chw)
    grad_values = None
    for n0 in range(0, batch, _CPP_BATCH_CHUNK):
        n1 = min(n0 + _CPP_BATCH_CHUNK, batch)
        grad_chunk = batch_last(grad_nchw[n0:n1], ctx.backend)
        part = SPARSE_CONV2D_WEIGHT_GRAD.kernel(ctx.backend)(grad_chunk, input_nchw[n0:n1].permute(1, 2, 3, 0),
                                                             crow, col, *ctx.geometry)
        grad_values = part if grad_values is None else grad_values.add_(part)
        chunk_input_grad = SPARSE_CONV2D_INPUT_GRAD.kernel(ctx.backend)(values, crow, col, grad_chunk, ctx.input_chw,
                                                                        *ctx.geometry)
        grad_input[n0:n1].copy_(nchw_contiguous(chunk_input_grad.permute(3, 0, 1, 2), ctx.backend))
    return grad_values, grad_input.permute(1, 2, 3, 0)


def _backward(ctx, grad):
    values, input_t, crow, col = ctx.saved_tensors
    chunked = ctx.backend == "cpp" and grad.dtype == torch.float32 and grad.shape[3] > _CPP_BATCH_CHUNK
    if chunked and ctx.needs_input_grad[0] and ctx.needs_input_grad[3] and _nchw_memory(grad) \
            and _nchw_memory(input_t):
        grad_values, grad_input = _backward_in_nchw_chunks(ctx, grad, values, input_t, crow, col)
        return (grad_values, None, None, grad_input, None, None, None, None, None)
    if not grad.is_contiguous() and not chunked:
        # once for both kernels (an NCHW caller's gradient: one tiled transpose); chunked kernels transpose their
        # chunks from the NCHW view themselves, which saves the copy of each chunk out of a transposed whole
        grad = batch_last(grad.permute(3, 0, 1, 2), ctx.backend)
    grad_values = grad_input = None
    if ctx.needs_input_grad[0]:
        grad_values = SPARSE_CONV2D_WEIGHT_GRAD.kernel(ctx.backend)(grad, input_t, crow, col, *ctx.geometry)
    if ctx.needs_input_grad[3]:
        grad_input = SPARSE_CONV2D_INPUT_GRAD.kernel(ctx.backend)(values, crow, col, grad, ctx.input_chw,
                                                                  *ctx.geometry)
    return (grad_values, None, None, grad_input, None, None, None, None, None)


sparse_conv2d_autograd = autograd_op(
    "sparse_conv2d_autograd",
    f"(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor input_t, {_GEOMETRY}, str backend) -> Tensor",
    _sparse_conv2d_autograd, _autograd_fake, _backward, _setup_context,
    flops=lambda values, *args, out_shape=None, **kwargs: _conv_flops(values[0], out_shape))


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------
def _pair(value, name: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise TypeError(f"sparse_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def sparse_conv2d(input: torch.Tensor, weight: SparseMatrix, kernel_size, bias: torch.Tensor | None = None,
                  stride=1, padding=0, dilation=1, *, backend: str | None = None,
                  channels_last_batch: bool = False) -> torch.Tensor:
    """A 2-D convolution (groups = 1, zero padding) with a sparse weight, differentiable w.r.t. input, the
    weight's values and bias, without im2col.

    Args:
        input: (N, C, H, W) (or (C, H, W, N) with ``channels_last_batch=True``).
        weight: SparseMatrix (out_channels, C * kh * kw): the dense weight flattened per output channel.
        kernel_size, stride, padding, dilation: ints or pairs.
        bias: (out_channels,) or None.
        backend: None (best available), "reference", "cpp", "cuda" or "triton".
        channels_last_batch: input and output in the kernels' (C, H, W, N) layout (no transposes).

    Returns:
        (N, O, H', W') (or (O, H', W', N)). A contiguous NCHW input on the CPU gets a contiguous NCHW output and its
        gradient in NCHW; otherwise the output is the kernels' (C, H, W, N) memory seen as (N, O, H', W') (an
        (N, C, H, W) view of (C, H, W, N) memory, as a previous sparse layer returns, keeps that layout).
    """
    if not isinstance(weight, SparseMatrix):
        raise TypeError(f"sparse_conv2d: weight must be a SparseMatrix, got {type(weight).__name__}")
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"sparse_conv2d: input must be a 4-D tensor, got "
                         f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
    input_t = input if channels_last_batch else input.permute(1, 2, 3, 0)
    channels = input_t.shape[0]
    if weight.shape[1] != channels * kernel_size[0] * kernel_size[1]:
        raise ValueError(f"sparse_conv2d: the weight has {weight.shape[1]} columns but the input has {channels} "
                         f"channels and the kernel is {kernel_size}: expected {channels * kernel_size[0] * kernel_size[1]}")
    if input_t.dtype != weight.dtype:
        raise TypeError(f"sparse_conv2d: input is {input_t.dtype} but the weight is {weight.dtype}")
    if input_t.device != weight.device:
        raise ValueError(f"sparse_conv2d: input is on {input_t.device} but the weight is on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"sparse_conv2d: bias must be ({weight.shape[0]},) {weight.dtype} on {weight.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    chosen = resolve_backend(backend, input_t.device, "sparse_conv2d")
    if kernel_size == [1, 1] and padding == [0, 0] and stride != [1, 1] and min(stride) >= 1:
        # a strided 1x1 convolution reads only every stride-th row and column: it is the stride-1 convolution of
        # that subsample. Copying the subsample (a plain strided copy, autograd scatters its gradient back) keeps
        # the kernels' layout change and input gradient to the positions read (ResNet-18's downsample: 3/4 of its
        # input is never read)
        if channels_last_batch:
            input_t = _Subsample.apply(input_t, 1, stride)
        else:
            input = _Subsample.apply(input, 2, stride)
            input_t = input.permute(1, 2, 3, 0)
        stride, dilation = [1, 1], [1, 1]
    nchw_caller = not channels_last_batch and input.is_contiguous() and input.device.type == "cpu" and input.numel()
    if nchw_caller:
        # NCHW: the input's gradient goes back in NCHW (left a (C, H, W, N) view, the caller's next op would copy it
        # with torch's slow transposing loop); the input itself is still read, and kept for the weight gradient, as a
        # view (no copy of the activation is kept)
        input_t = _GradientInNCHW.apply(input, resolve_backend(backend, input.device, "transpose_copy")).permute(
            1, 2, 3, 0)
    out_t = sparse_conv2d_autograd(weight.values, weight.crow_indices, weight.col_indices, input_t, kernel_size,
                                   stride, padding, dilation, chosen)
    if bias is not None:
        out_t = out_t.add_(bias.view(-1, 1, 1, 1))  # in place: a fresh output, not saved by the op
    if nchw_caller:
        # and the output in NCHW: ops that follow read a (C, H, W, N) view slowly (GroupNorm, forward and backward at
        # 128 x 64 x 32 x 32, 2 threads: 99 ms, 24 ms on NCHW); a caller in the kernels' layout keeps it
        return _OutputInNCHW.apply(out_t, resolve_backend(backend, input.device, "transpose_copy"))
    return out_t if channels_last_batch else out_t.permute(3, 0, 1, 2)
