"""Differentiable sampled dense x dense product (SDDMM): a matmul evaluated only at a pattern's nonzeros.

    fedspa::sampled_matmul(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, Tensor? perm,
                           Tensor t_crow_indices, Tensor t_col_indices, Tensor? t_perm, str backend,
                           bool validate=True) -> Tensor

``out[v] = dot(a[r, :], bt[c, :])`` for every nonzero (r, c) with value index v of the pattern given in CSR
(crow, col, perm) and transposed CSR (t_crow, t_col, t_perm). Gradients, with g the gradient of out:
    d a  = G @ bt     (fedspa::sparse_matmul over the pattern)
    d bt = G^T @ a    (fedspa::sparse_matmul over the transpose)
where G is the sparse matrix holding g at the pattern.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .._backends import BACKENDS, resolve_backend
from .._library import LIB, define
from ..sparse_matrix import SparseMatrix
from ._csr import check_transpose_pair
from .sddmm import check_sddmm_inputs, sddmm_reference

SAMPLED_MATMUL = "sampled_matmul"
define(
    SAMPLED_MATMUL,
    "(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, Tensor? perm, Tensor t_crow_indices, "
    "Tensor t_col_indices, Tensor? t_perm, str backend, bool validate=True) -> Tensor",
)


def sddmm_kernel(backend: str):
    """The fedspa::sddmm implementation of a backend."""
    if backend == "reference":
        return sddmm_reference
    if backend in ("cpp", "cuda"):
        return torch.ops.fedspa.sddmm
    if backend == "triton":
        return torch.ops.fedspa.sddmm_triton
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _sampled_matmul(a, bt, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, backend,
                    validate=True):
    kernel = sddmm_kernel(backend)
    if validate:
        check_sddmm_inputs(SAMPLED_MATMUL, a, bt, crow_indices, col_indices, perm, validate=False)
        check_transpose_pair(SAMPLED_MATMUL, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm,
                             a.shape[0], bt.shape[0], col_indices.numel())
    if backend not in ("cpp", "cuda"):  # native kernels transpose column-major operands themselves
        a, bt = a.contiguous(), bt.contiguous()
    return kernel(a, bt, crow_indices, col_indices, perm, False)


def _fake(a, bt, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, backend, validate=True):
    return a.new_empty(col_indices.shape[0])


def _setup_context(ctx, inputs, output):
    a, bt, crow, col, perm, tcrow, tcol, tperm, backend, _ = inputs
    ctx.backend = backend
    ctx.save_for_backward(
        a if ctx.needs_input_grad[1] else None,
        bt if ctx.needs_input_grad[0] else None,
        crow, col, perm, tcrow, tcol, tperm,
    )


def _backward(ctx, grad):
    a, bt, crow, col, perm, tcrow, tcol, tperm = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_bt = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.fedspa.sparse_matmul(grad, crow, col, perm, tcrow, tcol, tperm, bt, ctx.backend, False)
    if ctx.needs_input_grad[1]:
        grad_bt = torch.ops.fedspa.sparse_matmul(grad, tcrow, tcol, tperm, crow, col, perm, a, ctx.backend, False)
    return grad_a, grad_bt, None, None, None, None, None, None, None, None


LIB.impl(SAMPLED_MATMUL, _sampled_matmul, "CompositeExplicitAutograd")
torch.library.register_fake(f"fedspa::{SAMPLED_MATMUL}", _fake, lib=LIB)
torch.library.register_autograd(f"fedspa::{SAMPLED_MATMUL}", _backward, setup_context=_setup_context, lib=LIB)


@register_flop_formula(torch.ops.fedspa.sampled_matmul)
def _flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x nnz x the shared dimension: one dot product per sampled nonzero (torch.utils.flop_counter)."""
    return 2 * out_shape[0] * a_shape[1]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
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
    S.ensure_valid()
    chosen = resolve_backend(backend, a.device, "sddmm")
    return torch.ops.fedspa.sampled_matmul(a, b.t(), S.crow_indices, S.col_indices, None, S.ccol_indices,
                                           S.row_indices_t, S.perm_t, chosen, False)


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
