"""Transposed copy of a matrix: the layout change between (N, C, H, W) and the sparse convolutions' (C, H, W, N).

Kernel op (reference below, C++ CPU in csrc/cpu/transpose_copy.cpp, CUDA in csrc/cuda/transpose_copy.cu, Triton in
triton_kernels/transpose_copy.py):

    fedspa::transpose_copy(Tensor x) -> Tensor

``out = x.t().contiguous()`` for a 2-D floating-point x (rows x cols): out is (cols x rows), row-major, a new
tensor (never a view of x, even when x.t() happens to be contiguous). An (N, C, H, W) activation reshaped to
(N, C*H*W) comes out as (C*H*W, N): the sparse convolutions' layout, batch fastest, and back. torch's copy of a
transposed view runs on one thread without tiling (128 x 25088 fp32: 3.9 ms on 2 cores); the C++ kernel transposes
64 x 64 tiles of 8 x 8 AVX2 register blocks in parallel (1.6 ms).

Differentiable op (every backend):

    fedspa::transpose_copy_autograd(Tensor x, str backend) -> Tensor

whose gradient is the transposed copy of the output's gradient.
"""

from __future__ import annotations

import torch

from .._backends import resolve_backend
from .._checks import check_transpose_input
from .._op import KernelOp, autograd_op


def transpose_copy_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch fedspa::transpose_copy: ``x.t()`` copied into a new row-major tensor (the oracle)."""
    check_transpose_input("transpose_copy", x)
    out = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
    return out.copy_(x.t())


def _fake(x):
    torch._check(x.dim() == 2, lambda: f"transpose_copy: x must be 2-D, got {x.dim()}-D")
    return x.new_empty(x.shape[1], x.shape[0])


TRANSPOSE_COPY = KernelOp("transpose_copy", "(Tensor x) -> Tensor", reference=transpose_copy_reference, fake=_fake,
                          triton="fedspa_kernels.triton_kernels.transpose_copy:transpose_copy_triton")


def _transpose_copy_autograd(x, backend):
    return TRANSPOSE_COPY.kernel(backend)(x)


def _autograd_fake(x, backend):
    return _fake(x)


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[1]


def _backward(ctx, grad):
    return torch.ops.fedspa.transpose_copy_autograd(grad, ctx.backend), None


transpose_copy_autograd = autograd_op("transpose_copy_autograd", "(Tensor x, str backend) -> Tensor",
                                      _transpose_copy_autograd, _autograd_fake, _backward, _setup_context)


def transpose_copy(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``x.t()`` as a new row-major tensor, on the fastest kernel available; differentiable.

    Args:
        x: a 2-D floating-point tensor (rows x cols), any strides.
        backend: None (best available), "reference", "cpp", "cuda" or "triton".

    Returns:
        (cols x rows), contiguous, never sharing memory with x.
    """
    check_transpose_input("transpose_copy", x)
    return transpose_copy_autograd(x, resolve_backend(backend, x.device, "transpose_copy"))


# ------------------------------------------------------------------------------------------------------------------
# The layout changes between NCHW and the sparse convolutions' (C, H, W, N), on the tiled kernel where it helps
# ------------------------------------------------------------------------------------------------------------------
def batch_last(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """An (N, C, H, W) tensor's values as a contiguous (C, H, W, N) tensor (not differentiable: for autograd
    functions' own forward and backward). A contiguous CPU tensor goes through one tiled ``transpose_copy``; other
    layouts and devices through torch's copy."""
    if x.is_contiguous() and x.device.type == "cpu" and x.numel():
        n = x.shape[0]
        return TRANSPOSE_COPY.kernel(resolve_backend(backend, x.device, "transpose_copy"))(x.reshape(n, -1)).view(
            *x.shape[1:], n)
    return x.permute(1, 2, 3, 0).contiguous()


def nchw_contiguous(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """An (N, C, H, W) tensor as a contiguous NCHW tensor; one whose memory is (C, H, W, N) (a sparse
    convolution's output or input gradient) goes through one tiled ``transpose_copy`` on the CPU."""
    feature_major = x.permute(1, 2, 3, 0)
    if feature_major.is_contiguous() and not x.is_contiguous() and x.device.type == "cpu":
        n = x.shape[0]
        return TRANSPOSE_COPY.kernel(resolve_backend(backend, x.device, "transpose_copy"))(
            feature_major.reshape(-1, n)).view(x.shape)
    return x.contiguous()
