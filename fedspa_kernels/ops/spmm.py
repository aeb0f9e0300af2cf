"""SpMM: sparse (CSR) x dense.

    fedspa::spmm(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm, Tensor dense,
                 bool validate=True) -> Tensor

``out[r, :] = sum over k in [crow[r], crow[r+1]) of values[perm[k] if perm else k] * dense[col[k], :]``:
out is (rows x N) with rows = len(crow) - 1, dense is (cols x N). With the CSC metadata of a SparseMatrix as
(crow, col, perm) this is the transposed product S^T @ dense, reading the same values array. Accumulates in
fp32 (fp64 for fp64). ``validate=False`` skips reading the index arrays (callers that validated them already).
Kernels: the reference below (default), C++ CPU and CUDA (csrc/*/spmm.*), Triton (triton_kernels/spmm.py).
"""

from __future__ import annotations

import torch

from .._library import LIB, define
from ._csr import FLOAT_DTYPES, check_structure_metadata, check_structure_values, row_of_each_nonzero

SPMM = "spmm"
_SCHEMA = "(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? perm, Tensor dense, bool validate=True) -> Tensor"
define(SPMM, _SCHEMA)
define(SPMM + "_triton", _SCHEMA)


def check_spmm_inputs(op: str, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                      perm: torch.Tensor | None, dense: torch.Tensor, validate: bool) -> None:
    if values.dtype not in FLOAT_DTYPES or values.dim() != 1:
        raise TypeError(f"{op}: values must be a 1-D floating tensor, got {values.dtype} of shape {tuple(values.shape)}")
    if dense.dim() != 2:
        raise ValueError(f"{op}: dense must be 2-D (cols x N), got shape {tuple(dense.shape)}")
    if dense.dtype != values.dtype:
        raise TypeError(f"{op}: dense is {dense.dtype} but values are {values.dtype}")
    if dense.device != values.device:
        raise ValueError(f"{op}: dense is on {dense.device} but values are on {values.device}")
    check_structure_metadata(op, crow, col, perm, values.device)
    if validate:
        check_structure_values(op, crow, col, perm, dense.shape[0], values.numel())


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def spmm_reference(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                   perm: torch.Tensor | None, dense: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Pure-PyTorch fedspa::spmm: scatter the nonzeros into a dense matrix, then a dense matmul (the oracle)."""
    check_spmm_inputs(SPMM, values, crow_indices, col_indices, perm, dense, validate)
    acc = _accumulation_dtype(values.dtype)
    rows = crow_indices.numel() - 1
    v = values if perm is None else values[perm.long()]
    matrix = torch.zeros(rows, dense.shape[0], dtype=acc, device=values.device)
    matrix.index_put_((row_of_each_nonzero(crow_indices), col_indices.long()), v.to(acc), accumulate=True)
    return (matrix @ dense.to(acc)).to(values.dtype)


def _fake(values, crow_indices, col_indices, perm, dense, validate=True):
    torch._check(dense.dim() == 2, lambda: f"dense must be 2-D, got {dense.dim()}-D")
    return dense.new_empty(crow_indices.shape[0] - 1, dense.shape[1])


def _triton(values, crow_indices, col_indices, perm, dense, validate=True):
    from ..triton_kernels.spmm import spmm_triton

    return spmm_triton(values, crow_indices, col_indices, perm, dense, validate)


LIB.impl(SPMM, spmm_reference, "CompositeExplicitAutograd")
for _key in ("CPU", "CUDA"):
    LIB.impl(SPMM + "_triton", _triton, _key)
torch.library.register_fake(f"fedspa::{SPMM}", _fake, lib=LIB)
torch.library.register_fake(f"fedspa::{SPMM}_triton", _fake, lib=LIB)
