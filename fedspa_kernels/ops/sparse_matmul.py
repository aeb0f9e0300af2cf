"""Differentiable sparse x dense product, and the sparse linear layer built on it.

    fedspa::sparse_matmul(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm,
                          Tensor t_crow_indices, Tensor t_col_indices, Tensor? t_perm, Tensor dense,
                          str backend, bool validate=True) -> Tensor

Computes A @ dense, where A's nonzeros are given in CSR by (crow, col, perm) and, for the backward pass, in
transposed CSR (= CSC) by (t_crow, t_col, t_perm); both read the same ``values``. Gradients:
    d values = sddmm(grad, dense) at A's pattern         (fedspa::sampled_matmul)
    d dense  = A^T @ grad                                 (fedspa::sparse_matmul with the orders swapped)
so no dense matrix or dense weight gradient is ever formed, and the backward is itself differentiable.
`backend` names the kernels ("reference", "cpp", "cuda", "triton") used forward and backward.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .._backends import BACKENDS, resolve_backend
from .._library import LIB, define
from ..sparse_matrix import SparseMatrix
from ._csr import check_transpose_pair
from .spmm import check_spmm_inputs, spmm_reference

SPARSE_MATMUL = "sparse_matmul"
define(
    SPARSE_MATMUL,
    "(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm, Tensor t_crow_indices, "
    "Tensor t_col_indices, Tensor? t_perm, Tensor dense, str backend, bool validate=True) -> Tensor",
)


def spmm_kernel(backend: str):
    """The fedspa::spmm implementation of a backend."""
    if backend == "reference":
        return spmm_reference
    if backend in ("cpp", "cuda"):
        return torch.ops.fedspa.spmm
    if backend == "triton":
        return torch.ops.fedspa.spmm_triton
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _sparse_matmul(values, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, dense, backend,
                   validate=True):
    kernel = spmm_kernel(backend)
    if validate:
        check_spmm_inputs(SPARSE_MATMUL, values, crow_indices, col_indices, perm, dense, validate=False)
        check_transpose_pair(SPARSE_MATMUL, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm,
                             crow_indices.numel() - 1, dense.shape[0], values.numel())
    # native kernels transpose column-major operands themselves (in parallel); the others get a copy here
    return kernel(values, crow_indices, col_indices, perm, dense if backend in ("cpp", "cuda") else dense.contiguous(),
                  False)


def _fake(values, crow_indices, col_indices, perm, t_crow_indices, t_col_indices, t_perm, dense, backend,
          validate=True):
    return dense.new_empty(crow_indices.shape[0] - 1, dense.shape[1])


def _setup_context(ctx, inputs, output):
    values, crow, col, perm, tcrow, tcol, tperm, dense, backend, _ = inputs
    ctx.backend = backend
    ctx.save_for_backward(
        values if ctx.needs_input_grad[7] else None,
        dense if ctx.needs_input_grad[0] else None,
        crow, col, perm, tcrow, tcol, tperm,
    )


def _backward(ctx, grad):
    values, dense, crow, col, perm, tcrow, tcol, tperm = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_dense = None
    if ctx.needs_input_grad[0]:
        grad_values = torch.ops.fedspa.sampled_matmul(grad, dense, crow, col, perm, tcrow, tcol, tperm, ctx.backend,
                                                      False)
    if ctx.needs_input_grad[7]:
        grad_dense = torch.ops.fedspa.sparse_matmul(values, tcrow, tcol, tperm, crow, col, perm, grad, ctx.backend,
                                                    False)
    return grad_values, None, None, None, None, None, None, grad_dense, None, None


LIB.impl(SPARSE_MATMUL, _sparse_matmul, "CompositeExplicitAutograd")
torch.library.register_fake(f"fedspa::{SPARSE_MATMUL}", _fake, lib=LIB)
torch.library.register_autograd(f"fedspa::{SPARSE_MATMUL}", _backward, setup_context=_setup_context, lib=LIB)


@register_flop_formula(torch.ops.fedspa.sparse_matmul)
def _flops(values_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x nnz x dense columns: one multiply-add per stored nonzero per column (torch.utils.flop_counter)."""
    return 2 * values_shape[0] * out_shape[1]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def _check_operand(op: str, S: SparseMatrix, d: torch.Tensor, name: str) -> None:
    if not isinstance(S, SparseMatrix):
        raise TypeError(f"{op}: expected a SparseMatrix, got {type(S).__name__}")
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(d).__name__}")
    if d.dtype != S.dtype:
        raise TypeError(f"{op}: {name} is {d.dtype} but the sparse values are {S.dtype}")
    if d.device != S.device:
        raise ValueError(f"{op}: {name} is on {d.device} but the sparse matrix is on {S.device}")


def spmm(S: SparseMatrix, d: torch.Tensor, transpose: bool = False, backend: str | None = None) -> torch.Tensor:
    """``S @ d`` (or ``S^T @ d`` with ``transpose=True``), differentiable w.r.t. ``S.values`` and `d`.

    Args:
        S: the sparse matrix (rows x cols).
        d: dense (cols x N), or (rows x N) when transposed; a 1-D vector gives a 1-D result.
        transpose: multiply by S^T, through the cached transpose metadata (no re-sort, no value copy).
        backend: None (best available), "reference", "cpp", "cuda" or "triton".

    Returns:
        (rows x N) — (cols x N) when transposed.
    """
    _check_operand("spmm", S, d, "d")
    vector = d.dim() == 1
    dense = d.unsqueeze(1) if vector else d
    inner = S.shape[0] if transpose else S.shape[1]
    if dense.dim() != 2 or dense.shape[0] != inner:
        raise ValueError(f"spmm: {'S^T' if transpose else 'S'} has {inner} columns but d has shape {tuple(d.shape)}")
    S.ensure_valid()
    chosen = resolve_backend(backend, S.device, "spmm")
    forward = (S.crow_indices, S.col_indices, None)
    backward = (S.ccol_indices, S.row_indices_t, S.perm_t)
    first, second = (backward, forward) if transpose else (forward, backward)
    out = torch.ops.fedspa.sparse_matmul(S.values, *first, *second, dense, chosen, False)
    return out.squeeze(1) if vector else out


def sparse_linear(x: torch.Tensor, weight: SparseMatrix | torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a sparse W (out_features x in_features), differentiable w.r.t. x, W's values and bias.

    With a SparseMatrix no dense weight and no dense weight gradient is ever formed: the forward is
    ``(W @ x^T)^T``, the input gradient ``W^T @ dy^T`` and the weight gradient ``sddmm(dy^T, x^T)`` at W's
    nonzeros. A dense `weight` tensor is taken as the sparse matrix of its nonzeros (convenient, but its
    gradient is then a dense tensor, zero off the pattern).

    Args:
        x: (..., in_features).
        weight: SparseMatrix or dense tensor (out_features x in_features).
        bias: (out_features,) or None.
        backend: None (best available), "reference", "cpp", "cuda" or "triton".
    """
    S = weight if isinstance(weight, SparseMatrix) else SparseMatrix.from_dense(weight)
    _check_operand("sparse_linear", S, x, "x")
    out_features, in_features = S.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"sparse_linear: x has shape {tuple(x.shape)} but the weight has {in_features} input features")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"sparse_linear: bias must be ({out_features},) {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    lead = x.shape[:-1]
    y_t = spmm(S, x.reshape(-1, in_features).t(), backend=backend)  # (out x batch), feature-major
    y = y_t.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
