"""Direct sparse 2-D convolution (no im2col), with autograd.

The weight is a SparseMatrix W of shape (out_channels, in_channels * kh * kw) (the dense weight flattened per
output channel, column j = (c * kh + ky) * kw + kx); activations are feature-major, ``(C, H, W, N)`` with the
batch last, so that every nonzero weight at every output position reads a contiguous batch vector: the
convolution is an SpMM whose dense operand (the unfolded input) is never materialized. Three kernel ops, each
with a reference (the dense convolution: the oracle), C++ CPU, CUDA and Triton kernels:

    fedspa::spconv2d(values, crow, col, perm?, input_t, kernel, stride, padding, dilation, validate)
        -> out_t (O, H', W', N)
    fedspa::spconv2d_input_grad(values, t_crow, t_col, t_perm?, grad_out_t, input_hw, kernel, stride, padding,
                                dilation, validate) -> grad_input_t (C, H, W, N)      (through W's transposed order)
    fedspa::spconv2d_weight_grad(grad_out_t, input_t, crow, col, perm?, kernel, stride, padding, dilation,
                                 validate) -> grad_values (nnz, in value order)

and the differentiable ``fedspa::sparse_conv2d`` taking both orders of W. Double backward is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .._backends import BACKENDS, resolve_backend
from .._library import LIB, define
from ..sparse_matrix import SparseMatrix
from ._csr import (FLOAT_DTYPES, check_structure_metadata, check_structure_values, check_transpose_pair,
                   row_of_each_nonzero)

_GEOMETRY = "int[] kernel_size, int[] stride, int[] padding, int[] dilation"
_FORWARD = (f"(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm, Tensor input_t, {_GEOMETRY}, "
            "bool validate=True) -> Tensor")
_INPUT_GRAD = (f"(Tensor values, Tensor t_crow_indices, Tensor t_col_indices, Tensor? t_perm, Tensor grad_out_t, "
               f"int[] input_hw, {_GEOMETRY}, bool validate=True) -> Tensor")
_WEIGHT_GRAD = (f"(Tensor grad_out_t, Tensor input_t, Tensor crow_indices, Tensor col_indices, Tensor? perm, "
                f"{_GEOMETRY}, bool validate=True) -> Tensor")
for _name, _schema in (("spconv2d", _FORWARD), ("spconv2d_input_grad", _INPUT_GRAD),
                       ("spconv2d_weight_grad", _WEIGHT_GRAD)):
    define(_name, _schema)
    define(_name + "_triton", _schema)
define("sparse_conv2d", f"(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm, "
                        f"Tensor t_crow_indices, Tensor t_col_indices, Tensor? t_perm, Tensor input_t, {_GEOMETRY}, "
                        "str backend, bool validate=True) -> Tensor")


# --------------------------------------------------------------------------------------------------------------
# Geometry and checks
# --------------------------------------------------------------------------------------------------------------
def output_hw(input_hw, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(input_hw, kernel_size, stride, padding, dilation))


def check_geometry(op: str, kernel_size, stride, padding, dilation) -> None:
    for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                             ("dilation", dilation, 1)):
        if len(value) != 2 or any(v < low for v in value):
            raise ValueError(f"{op}: {name} must be two integers >= {low}, got {list(value)}")


def check_activation(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (C, H, W, N), got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but the weights are {dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the weights are on {device}")


def check_forward_inputs(op, values, crow, col, perm, input_t, kernel_size, stride, padding, dilation,
                         validate) -> tuple[int, int]:
    """Checks fedspa::spconv2d's inputs; returns the output (H', W')."""
    if values.dtype not in FLOAT_DTYPES or values.dim() != 1:
        raise TypeError(f"{op}: values must be a 1-D floating tensor, got {values.dtype} of shape {tuple(values.shape)}")
    check_geometry(op, kernel_size, stride, padding, dilation)
    check_activation(op, "input_t", input_t, values.dtype, values.device)
    check_structure_metadata(op, crow, col, perm, values.device)
    out_h, out_w = output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: input of {tuple(input_t.shape[1:3])} gives an empty output with kernel "
                         f"{list(kernel_size)}, stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    if validate:
        check_structure_values(op, crow, col, perm, input_t.shape[0] * kernel_size[0] * kernel_size[1], values.numel())
    return out_h, out_w


def check_input_grad_inputs(op, values, t_crow, t_col, t_perm, grad_out_t, input_hw, kernel_size, stride, padding,
                            dilation, validate) -> int:
    """Checks fedspa::spconv2d_input_grad's inputs; returns the number of input channels."""
    if values.dtype not in FLOAT_DTYPES or values.dim() != 1:
        raise TypeError(f"{op}: values must be a 1-D floating tensor, got {values.dtype} of shape {tuple(values.shape)}")
    check_geometry(op, kernel_size, stride, padding, dilation)
    check_activation(op, "grad_out_t", grad_out_t, values.dtype, values.device)
    check_structure_metadata(op, t_crow, t_col, t_perm, values.device)
    if len(input_hw) != 2 or any(v < 1 for v in input_hw):
        raise ValueError(f"{op}: input_hw must be two integers >= 1, got {list(input_hw)}")
    taps = kernel_size[0] * kernel_size[1]
    if (t_crow.numel() - 1) % taps != 0:
        raise ValueError(f"{op}: the transposed order has {t_crow.numel() - 1} rows, not a multiple of the kernel's "
                         f"{taps} taps")
    expected = output_hw(input_hw, kernel_size, stride, padding, dilation)
    if tuple(grad_out_t.shape[1:3]) != tuple(expected):
        raise ValueError(f"{op}: grad_out_t is {tuple(grad_out_t.shape)} but an input of {list(input_hw)} gives "
                         f"{tuple(expected)} outputs")
    if validate:
        check_structure_values(op, t_crow, t_col, t_perm, grad_out_t.shape[0], values.numel())
    return (t_crow.numel() - 1) // taps


def check_weight_grad_inputs(op, grad_out_t, input_t, crow, col, perm, kernel_size, stride, padding, dilation,
                             validate) -> None:
    """Checks fedspa::spconv2d_weight_grad's inputs."""
    check_geometry(op, kernel_size, stride, padding, dilation)
    if input_t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: input_t must be floating, got {input_t.dtype}")
    check_activation(op, "input_t", input_t, input_t.dtype, input_t.device)
    check_activation(op, "grad_out_t", grad_out_t, input_t.dtype, input_t.device)
    check_structure_metadata(op, crow, col, perm, input_t.device)
    expected = (crow.numel() - 1, *output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation),
                input_t.shape[3])
    if tuple(grad_out_t.shape) != expected:
        raise ValueError(f"{op}: grad_out_t is {tuple(grad_out_t.shape)}, expected {expected}")
    if validate:
        check_structure_values(op, crow, col, perm, input_t.shape[0] * kernel_size[0] * kernel_size[1], col.numel())


# --------------------------------------------------------------------------------------------------------------
# References (the dense convolution through torch: the oracle)
# --------------------------------------------------------------------------------------------------------------
def _dense_weight(values, crow, col, perm, rows, cols, kernel_size):
    v = values if perm is None else values[perm.long()]
    w = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    w.index_put_((row_of_each_nonzero(crow), col.long()), v, accumulate=True)
    return w.reshape(rows, cols // (kernel_size[0] * kernel_size[1]), *kernel_size)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(3, 0, 1, 2)


def _feature_major(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 3, 0).contiguous()


def spconv2d_reference(values, crow_indices, col_indices, perm, input_t, kernel_size, stride, padding, dilation,
                       validate=True):
    """Pure-PyTorch fedspa::spconv2d: the dense weight through F.conv2d."""
    check_forward_inputs("spconv2d", values, crow_indices, col_indices, perm, input_t, kernel_size, stride, padding,
                         dilation, validate)
    channels = input_t.shape[0]
    weight = _dense_weight(values, crow_indices, col_indices, perm, crow_indices.numel() - 1,
                           channels * kernel_size[0] * kernel_size[1], kernel_size)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = F.conv2d(_nchw(input_t).to(acc), weight.to(acc), None, list(stride), list(padding), list(dilation))
    return _feature_major(out).to(values.dtype)


def spconv2d_input_grad_reference(values, t_crow_indices, t_col_indices, t_perm, grad_out_t, input_hw, kernel_size,
                                  stride, padding, dilation, validate=True):
    """Pure-PyTorch fedspa::spconv2d_input_grad: torch.nn.grad.conv2d_input with the dense weight."""
    check_input_grad_inputs("spconv2d_input_grad", values, t_crow_indices, t_col_indices, t_perm, grad_out_t,
                            input_hw, kernel_size, stride, padding, dilation, validate)
    cols = t_crow_indices.numel() - 1
    out_channels = grad_out_t.shape[0]
    # the transposed order's rows are W's columns: rebuild W (out x cols) from it
    v = values if t_perm is None else values[t_perm.long()]
    weight = torch.zeros(out_channels, cols, dtype=values.dtype, device=values.device)
    weight.index_put_((t_col_indices.long(), row_of_each_nonzero(t_crow_indices)), v, accumulate=True)
    in_channels = cols // (kernel_size[0] * kernel_size[1])
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    grad = torch.nn.grad.conv2d_input((grad_out_t.shape[3], in_channels, *input_hw),
                                      weight.reshape(out_channels, in_channels, *kernel_size).to(acc),
                                      _nchw(grad_out_t).to(acc), list(stride), list(padding), list(dilation))
    return _feature_major(grad).to(values.dtype)


def spconv2d_weight_grad_reference(grad_out_t, input_t, crow_indices, col_indices, perm, kernel_size, stride,
                                   padding, dilation, validate=True):
    """Pure-PyTorch fedspa::spconv2d_weight_grad: torch.nn.grad.conv2d_weight, read at the nonzeros."""
    check_weight_grad_inputs("spconv2d_weight_grad", grad_out_t, input_t, crow_indices, col_indices, perm,
                             kernel_size, stride, padding, dilation, validate)
    cols = input_t.shape[0] * kernel_size[0] * kernel_size[1]
    acc = torch.float64 if input_t.dtype == torch.float64 else torch.float32
    out_channels = crow_indices.numel() - 1
    grad = torch.nn.grad.conv2d_weight(_nchw(input_t).to(acc), (out_channels, input_t.shape[0], *kernel_size),
                                       _nchw(grad_out_t).to(acc), list(stride), list(padding), list(dilation))
    in_csr_order = grad.reshape(out_channels, cols)[row_of_each_nonzero(crow_indices), col_indices.long()]
    if perm is None:
        return in_csr_order.to(input_t.dtype)
    out = torch.empty_like(in_csr_order)
    out[perm.long()] = in_csr_order
    return out.to(input_t.dtype)


# --------------------------------------------------------------------------------------------------------------
# Fake kernels, Triton registrations
# --------------------------------------------------------------------------------------------------------------
def _forward_fake(values, crow_indices, col_indices, perm, input_t, kernel_size, stride, padding, dilation,
                  validate=True):
    out_h, out_w = output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation)
    return input_t.new_empty(crow_indices.shape[0] - 1, out_h, out_w, input_t.shape[3])


def _input_grad_fake(values, t_crow_indices, t_col_indices, t_perm, grad_out_t, input_hw, kernel_size, stride,
                     padding, dilation, validate=True):
    channels = (t_crow_indices.shape[0] - 1) // (kernel_size[0] * kernel_size[1])
    return grad_out_t.new_empty(channels, input_hw[0], input_hw[1], grad_out_t.shape[3])


def _weight_grad_fake(grad_out_t, input_t, crow_indices, col_indices, perm, kernel_size, stride, padding, dilation,
                      validate=True):
    return input_t.new_empty(col_indices.shape[0])


def _triton(name):
    def launcher(*args):
        from ..triton_kernels import sparse_conv2d as kernels

        return getattr(kernels, name + "_triton")(*args)

    return launcher


_REFERENCES = {"spconv2d": spconv2d_reference, "spconv2d_input_grad": spconv2d_input_grad_reference,
               "spconv2d_weight_grad": spconv2d_weight_grad_reference}
for _name, _fake in (("spconv2d", _forward_fake), ("spconv2d_input_grad", _input_grad_fake),
                     ("spconv2d_weight_grad", _weight_grad_fake)):
    LIB.impl(_name, _REFERENCES[_name], "CompositeExplicitAutograd")
    for _key in ("CPU", "CUDA"):
        LIB.impl(_name + "_triton", _triton(_name), _key)
    torch.library.register_fake(f"fedspa::{_name}", _fake, lib=LIB)
    torch.library.register_fake(f"fedspa::{_name}_triton", _fake, lib=LIB)


def kernel(backend: str, name: str):
    """The implementation of kernel op `name` on a backend."""
    if backend == "reference":
        return _REFERENCES[name]
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.fedspa, name)
    if backend == "triton":
        return getattr(torch.ops.fedspa, name + "_triton")
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------------------------------
# The differentiable op
# --------------------------------------------------------------------------------------------------------------
def _sparse_conv2d(values, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, input_t,
                   kernel_size, stride, padding, dilation, backend, validate=True):
    forward = kernel(backend, "spconv2d")
    if validate:
        check_forward_inputs("sparse_conv2d", values, crow_indices, col_indices, perm, input_t, kernel_size, stride,
                             padding, dilation, False)
        check_transpose_pair("sparse_conv2d", crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm,
                             crow_indices.numel() - 1, input_t.shape[0] * kernel_size[0] * kernel_size[1],
                             values.numel())
    return forward(values, crow_indices, col_indices, perm, input_t, kernel_size, stride, padding, dilation, False)


def _sparse_conv2d_fake(values, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, input_t,
                        kernel_size, stride, padding, dilation, backend, validate=True):
    return _forward_fake(values, crow_indices, col_indices, perm, input_t, kernel_size, stride, padding, dilation)


def _setup_context(ctx, inputs, output):
    values, crow, col, perm, tcrow, tcol, tperm, input_t, kernel_size, stride, padding, dilation, backend, _ = inputs
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation))
    ctx.input_hw = list(input_t.shape[1:3])
    ctx.backend = backend
    ctx.save_for_backward(values if ctx.needs_input_grad[7] else None, input_t if ctx.needs_input_grad[0] else None,
                          crow, col, perm, tcrow, tcol, tperm)


def _backward(ctx, grad):
    values, input_t, crow, col, perm, tcrow, tcol, tperm = ctx.saved_tensors
    grad_values = grad_input = None
    if ctx.needs_input_grad[0]:
        grad_values = kernel(ctx.backend, "spconv2d_weight_grad")(grad, input_t, crow, col, perm, *ctx.geometry, False)
    if ctx.needs_input_grad[7]:
        grad_input = kernel(ctx.backend, "spconv2d_input_grad")(values, tcrow, tcol, tperm, grad, ctx.input_hw,
                                                                *ctx.geometry, False)
    return (grad_values, None, None, None, None, None, None, grad_input, None, None, None, None, None, None)


LIB.impl("sparse_conv2d", _sparse_conv2d, "CompositeExplicitAutograd")
torch.library.register_fake("fedspa::sparse_conv2d", _sparse_conv2d_fake, lib=LIB)
torch.library.register_autograd("fedspa::sparse_conv2d", _backward, setup_context=_setup_context, lib=LIB)


def _conv_flops(nnz: int, grad_out_shape) -> int:
    """2 x nnz x output positions x batch: one multiply-add per nonzero weight per output pixel."""
    return 2 * nnz * grad_out_shape[1] * grad_out_shape[2] * grad_out_shape[3]


# torch.utils.flop_counter formulas: the differentiable op (forward) and the gradient kernels its backward calls
register_flop_formula(torch.ops.fedspa.sparse_conv2d)(
    lambda values, *args, out_shape=None, **kwargs: _conv_flops(values[0], out_shape))
for _op in (torch.ops.fedspa.spconv2d, torch.ops.fedspa.spconv2d_triton):
    register_flop_formula(_op)(lambda values, *args, out_shape=None, **kwargs: _conv_flops(values[0], out_shape))
for _op in (torch.ops.fedspa.spconv2d_input_grad, torch.ops.fedspa.spconv2d_input_grad_triton):
    register_flop_formula(_op)(lambda values, t_crow, t_col, t_perm, grad_out, *args, out_shape=None, **kwargs:
                               _conv_flops(values[0], grad_out))
for _op in (torch.ops.fedspa.spconv2d_weight_grad, torch.ops.fedspa.spconv2d_weight_grad_triton):
    register_flop_formula(_op)(lambda grad_out, *args, out_shape=None, **kwargs: _conv_flops(out_shape[0], grad_out))


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
        (N, O, H', W') (or (O, H', W', N)).
    """
    if not isinstance(weight, SparseMatrix):
        raise TypeError(f"sparse_conv2d: weight must be a SparseMatrix, got {type(weight).__name__}")
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    if input.dim() != 4:
        raise ValueError(f"sparse_conv2d: input must be 4-D, got shape {tuple(input.shape)}")
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
    weight.ensure_valid()
    chosen = resolve_backend(backend, input_t.device, "spconv2d")
    if chosen not in ("cpp", "cuda"):
        input_t = input_t.contiguous()  # native kernels make their own (parallel) copies
    out_t = torch.ops.fedspa.sparse_conv2d(weight.values, weight.crow_indices, weight.col_indices, None,
                                           weight.ccol_indices, weight.row_indices_t, weight.perm_t, input_t,
                                           kernel_size, stride, padding, dilation, chosen, False)
    if bias is not None:
        out_t = out_t + bias.view(-1, 1, 1, 1)
    return out_t if channels_last_batch else out_t.permute(3, 0, 1, 2)
