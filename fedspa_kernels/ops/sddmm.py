"""SDDMM: a dense x dense product evaluated only at a sparsity pattern's nonzeros, and its differentiable form.

Kernel op (reference below, C++ CPU and CUDA in csrc/*/sddmm.*, Triton in triton_kernels/sddmm.py):

    fedspa::sddmm(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices) -> Tensor

For nonzero k = (r_k, c_k) of the CSR pattern: ``out[k] = dot(a[r_k, :], bt[c_k, :])``. a is (rows x K), bt is
(cols x K) — the second factor transposed, so both operands are read along contiguous rows; out has nnz entries
in CSR order. Accumulates in fp32 (fp64 for fp64). Only the sampled dot products are formed: a NaN in a row of
`a` reaches exactly that row's nonzeros.

Differentiable op (every backend):

    fedspa::sddmm_autograd(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, str backend) -> Tensor

with gradients d a = G @ bt and d bt = G^T @ a (fedspa::spmm_autograd), G the sparse matrix of the output
gradient at the pattern (in CSR order, like the output).
"""

from __future__ import annotations

import torch

from .._backends import resolve_backend
from .._checks import check_sddmm_inputs, row_of_each_nonzero
from .._op import KernelOp, autograd_op
from ..sparse_matrix import SparseMatrix

_CHUNK_ELEMENTS = 1 << 22  # the reference's temporary: at most this many products at a time


def sddmm_reference(a: torch.Tensor, bt: torch.Tensor, crow_indices: torch.Tensor,
                    col_indices: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch fedspa::sddmm: gather both rows of each nonzero and reduce, in chunks (the oracle)."""
    check_sddmm_inputs("sddmm", a, bt, crow_indices, col_indices)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    rows = row_of_each_nonzero(crow_indices)
    cols = col_indices.long()
    out = torch.empty(cols.numel(), dtype=acc, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, cols.numel(), step):
        stop = start + step
        out[start:stop] = (a[rows[start:stop]].to(acc) * bt[cols[start:stop]].to(acc)).sum(dim=1)
    return out.to(a.dtype)


def _fake(a, bt, crow_indices, col_indices):
    return a.new_empty(col_indices.shape[0])


def _flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x nnz x K: one dot product per sampled nonzero."""
    return 2 * out_shape[0] * a_shape[1]


SDDMM = KernelOp("sddmm", "(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices) -> Tensor",
                 reference=sddmm_reference, fake=_fake, triton="fedspa_kernels.triton_kernels.sddmm:sddmm_triton",
                 flops=_flops)


# ------------------------------------------------------------------------------------------------------------------
# The differentiable op
# ------------------------------------------------------------------------------------------------------------------
def _sddmm_autograd(a, bt, crow_indices, col_indices, backend):
    if backend not in ("cpp", "cuda"):  # native kernels transpose column-major operands themselves
        a, bt = a.contiguous(), bt.contiguous()
    return SDDMM.kernel(backend)(a, bt, crow_indices, col_indices)


def _autograd_fake(a, bt, crow_indices, col_indices, backend):
    return a.new_empty(col_indices.shape[0])


def _setup_context(ctx, inputs, output):
    a, bt, crow, col, backend = inputs
    ctx.backend, ctx.cols = backend, bt.shape[0]
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, bt if ctx.needs_input_grad[0] else None, crow, col)


def _backward(ctx, grad):
    a, bt, crow, col = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_bt = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.fedspa.spmm_autograd(grad, crow, col, bt, False, ctx.cols, ctx.backend)
    if ctx.needs_input_grad[1]:
        grad_bt = torch.ops.fedspa.spmm_autograd(grad, crow, col, a, True, ctx.cols, ctx.backend)
    return grad_a, grad_bt, None, None, None


sddmm_autograd = autograd_op(
    "sddmm_autograd", "(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, str backend) -> Tensor",
    _sddmm_autograd, _autograd_fake, _backward, _setup_context, flops=_flops)


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------
def _check_factors(op: str, a: torch.Tensor, b: torch.Tensor, rows: int, cols: int) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if a.shape[1] != b.shape[0] or a.shape[0] != rows or b.shape[1] != cols:
        raise ValueError(f"{op}: a {tuple(a.shape)} @ b {tuple(b.shape)} does not give the pattern's shape "
                         f"({rows}, {cols})")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: a is {a.dtype} but b is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: a is on {a.device} but b is on {b.device}")


def sddmm(a: torch.Tensor, b: torch.Tensor, S: SparseMatrix, backend: str | None = None) -> torch.Tensor:
    """``(a @ b)`` evaluated only at S's nonzeros, in S's CSR order; differentiable w.r.t. a and b.

    Args:
        a: (rows x K). b: (K x cols). S: the pattern (its values are not used).
        backend: None (best available), "reference", "cpp", "cuda" or "triton".

    Returns:
        (nnz,) tensor: entry k is ``a[r_k, :] @ b[:, c_k]``.
    """
    if not isinstance(S, SparseMatrix):
        raise TypeError(f"sddmm: expected a SparseMatrix pattern, got {type(S).__name__}")
    _check_factors("sddmm", a, b, *S.shape)
    if a.device != S.device:
        raise ValueError(f"sddmm: a is on {a.device} but the pattern is on {S.device}")
    chosen = resolve_backend(backend, a.device, "sddmm")
    return sddmm_autograd(a, b.t(), S.crow_indices, S.col_indices, chosen)


def masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``(a @ b)[mask]``, computed only at the mask's True entries (row-major order); differentiable.

    Args:
        a: (rows x K). b: (K x cols). mask: bool (rows x cols) on the same device.
        backend: None (best available), "reference", "cpp", "cuda" or "triton".
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"masked_matmul: mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"masked_matmul: mask must be 2-D, got shape {tuple(mask.shape)}")
    _check_factors("masked_matmul", a, b, *mask.shape)
    if mask.device != a.device:
        raise ValueError(f"masked_matmul: mask is on {mask.device} but a is on {a.device}")
    return sddmm(a, b, SparseMatrix.from_mask(mask, dtype=a.dtype), backend=backend)
