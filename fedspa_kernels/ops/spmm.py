"""SpMM: sparse (CSR) x dense and sparse^T x dense, their differentiable form, and the sparse linear layer.

Kernel ops (references below, C++ CPU and CUDA in csrc/*/spmm*.*, Triton in triton_kernels/spmm.py):

    fedspa::spmm(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense) -> Tensor
    fedspa::spmm_transposed(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense, int cols) -> Tensor

spmm: ``out[r, :] = sum over k in [crow[r], crow[r+1]) of values[k] * dense[col[k], :]``: out is (rows x N) with
rows = len(crow) - 1, dense is (cols x N). spmm_transposed: ``out = S^T @ dense`` for S (rows x cols) given in CSR
and dense (rows x N), out (cols x N): ``out[col[k], :] += values[k] * dense[r, :]`` for every nonzero k of row r.
Both read only the CSR pattern: no transposed copy of a pattern is kept anywhere (the C++ kernel scatters along
the rows; the CUDA and Triton kernels build the transposed order for the call). Accumulate in fp32 (fp64 for
fp64). Only stored entries multiply: a NaN or Inf in a dense row reaches exactly the outputs its nonzeros feed (as
torch.sparse does; a stored zero times Inf is NaN, as IEEE says).

Differentiable op (every backend):

    fedspa::spmm_autograd(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense, bool transpose,
                          int cols, str backend) -> Tensor

S @ dense (or S^T @ dense) for S (rows x cols) in CSR. Gradients: d values = SDDMM at S's pattern, in CSR order
(fedspa::sddmm_autograd); d dense = the product the other way round. No dense matrix or dense weight gradient is
ever formed.
"""

from __future__ import annotations

import torch

from .._backends import resolve_backend
from .._checks import check_spmm_inputs, row_of_each_nonzero
from .._op import KernelOp, autograd_op
from ..sparse_matrix import SparseMatrix

_CHUNK_ELEMENTS = 1 << 22  # the reference's temporary: at most this many products at a time


def _products_into(out: torch.Tensor, into: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                   read: torch.Tensor) -> torch.Tensor:
    """``out[into[k]] += values[k] * dense[read[k]]`` for every stored entry k, in chunks (the references' loop)."""
    step = max(1, _CHUNK_ELEMENTS // max(dense.shape[1], 1))
    for start in range(0, values.numel(), step):
        stop = start + step
        products = values[start:stop].to(out.dtype)[:, None] * dense[read[start:stop]].to(out.dtype)
        out.index_add_(0, into[start:stop], products)
    return out


def spmm_reference(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                   dense: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch fedspa::spmm: each stored entry times its dense row, added into its output row (the oracle)."""
    check_spmm_inputs("spmm", values, crow_indices, col_indices, dense)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.zeros(crow_indices.numel() - 1, dense.shape[1], dtype=acc, device=values.device)
    return _products_into(out, row_of_each_nonzero(crow_indices), values, dense, col_indices.long()).to(values.dtype)


def _fake(values, crow_indices, col_indices, dense):
    torch._check(dense.dim() == 2, lambda: f"dense must be 2-D, got {dense.dim()}-D")
    return dense.new_empty(crow_indices.shape[0] - 1, dense.shape[1])


def _flops(values_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x nnz x dense columns: one multiply-add per stored nonzero per column."""
    return 2 * values_shape[0] * out_shape[1]


SPMM = KernelOp("spmm", "(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense) -> Tensor",
                reference=spmm_reference, fake=_fake, triton="fedspa_kernels.triton_kernels.spmm:spmm_triton",
                flops=_flops)


def spmm_transposed_reference(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                              dense: torch.Tensor, cols: int) -> torch.Tensor:
    """Pure-PyTorch fedspa::spmm_transposed: each stored entry times its dense row, added into the output row of its
    column (the oracle)."""
    check_spmm_inputs("spmm_transposed", values, crow_indices, col_indices, dense, cols)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.zeros(cols, dense.shape[1], dtype=acc, device=values.device)
    return _products_into(out, col_indices.long(), values, dense, row_of_each_nonzero(crow_indices)).to(values.dtype)


def _transposed_fake(values, crow_indices, col_indices, dense, cols):
    torch._check(dense.dim() == 2, lambda: f"dense must be 2-D, got {dense.dim()}-D")
    return dense.new_empty(cols, dense.shape[1])


SPMM_TRANSPOSED = KernelOp(
    "spmm_transposed",
    "(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense, int cols) -> Tensor",
    reference=spmm_transposed_reference, fake=_transposed_fake,
    triton="fedspa_kernels.triton_kernels.spmm:spmm_transposed_triton", flops=_flops)


# ------------------------------------------------------------------------------------------------------------------
# The differentiable op
# ------------------------------------------------------------------------------------------------------------------
def _spmm_autograd(values, crow_indices, col_indices, dense, transpose, cols, backend):
    if backend not in ("cpp", "cuda"):  # native kernels transpose column-major operands themselves (in parallel)
        dense = dense.contiguous()
    if transpose:
        return SPMM_TRANSPOSED.kernel(backend)(values, crow_indices, col_indices, dense, cols)
    return SPMM.kernel(backend)(values, crow_indices, col_indices, dense)


def _autograd_fake(values, crow_indices, col_indices, dense, transpose, cols, backend):
    return dense.new_empty(cols if transpose else crow_indices.shape[0] - 1, dense.shape[1])


def _column_major(t: torch.Tensor) -> bool:
    """A 2-D tensor laid out as its transpose's contiguous memory (e.g. ``x.t()`` of a row-major x)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def _setup_context(ctx, inputs, output):
    values, crow, col, dense, transpose, cols, backend = inputs
    ctx.transpose, ctx.cols, ctx.backend = transpose, cols, backend
    ctx.dense_column_major = _column_major(dense)
    ctx.save_for_backward(values if ctx.needs_input_grad[3] else None, dense if ctx.needs_input_grad[0] else None,
                          crow, col)


def _backward(ctx, grad):
    values, dense, crow, col = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_dense = None
    if ctx.needs_input_grad[0]:  # in CSR order whichever way the product went
        a, bt = (dense, grad) if ctx.transpose else (grad, dense)
        grad_values = torch.ops.fedspa.sddmm_autograd(a, bt, crow, col, ctx.backend)
    if ctx.needs_input_grad[3]:
        grad_dense = torch.ops.fedspa.spmm_autograd(values, crow, col, grad, not ctx.transpose, ctx.cols, ctx.backend)
        if ctx.dense_column_major:  # the gradient in its operand's layout: a row-major x gets a row-major x.grad
            grad_dense = torch.ops.fedspa.transpose_copy_autograd(grad_dense, ctx.backend).t()
    return grad_values, None, None, grad_dense, None, None, None


spmm_autograd = autograd_op(
    "spmm_autograd",
    "(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense, bool transpose, int cols, str backend) "
    "-> Tensor",
    _spmm_autograd, _autograd_fake, _backward, _setup_context, flops=_flops)


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------
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
        transpose: multiply by S^T (from the same CSR pattern).
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
    chosen = resolve_backend(backend, S.device, "spmm")
    out = spmm_autograd(S.values, S.crow_indices, S.col_indices, dense, bool(transpose), S.shape[1], chosen)
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
    y = spmm(S, x.reshape(-1, in_features).t(), backend=backend).t()  # the kernels work feature-major
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
