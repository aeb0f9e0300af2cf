"""SDDMM: a dense x dense product evaluated only at a sparsity pattern's nonzeros.

    fedspa::sddmm(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, Tensor? perm,
                  bool validate=True) -> Tensor

For nonzero k = (r_k, c_k) of the CSR pattern: ``dot(a[r_k, :], bt[c_k, :])``, written to ``out[perm[k]]``
(``out[k]`` without perm). a is (rows x K), bt is (cols x K) — the second factor transposed, so both
operands are read along contiguous rows. out has nnz entries, in the pattern's value order. Accumulates in
fp32 (fp64 for fp64). Kernels: the reference below (default), C++ CPU and CUDA (csrc/*/sddmm.*), Triton.
"""

from __future__ import annotations

import torch

from .._library import LIB, define
from ._csr import FLOAT_DTYPES, check_structure_metadata, check_structure_values, row_of_each_nonzero

SDDMM = "sddmm"
_SCHEMA = "(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices, Tensor? perm, bool validate=True) -> Tensor"
define(SDDMM, _SCHEMA)
define(SDDMM + "_triton", _SCHEMA)

_CHUNK = 1 << 16  # nonzeros per step of the reference (bounds its temporary to CHUNK x K)


def check_sddmm_inputs(op: str, a: torch.Tensor, bt: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                       perm: torch.Tensor | None, validate: bool) -> None:
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: a must be floating (fp16/bf16/fp32/fp64), got {a.dtype}")
    if bt.dtype != a.dtype:
        raise TypeError(f"{op}: bt is {bt.dtype} but a is {a.dtype}")
    if a.dim() != 2 or bt.dim() != 2 or a.shape[1] != bt.shape[1]:
        raise ValueError(f"{op}: a (rows x K) and bt (cols x K) must be 2-D with equal K, got {tuple(a.shape)} and "
                         f"{tuple(bt.shape)}")
    if bt.device != a.device:
        raise ValueError(f"{op}: bt is on {bt.device} but a is on {a.device}")
    check_structure_metadata(op, crow, col, perm, a.device)
    if crow.numel() != a.shape[0] + 1:
        raise ValueError(f"{op}: crow_indices has {crow.numel()} entries but a has {a.shape[0]} rows")
    if validate:
        check_structure_values(op, crow, col, perm, bt.shape[0], col.numel())


def sddmm_reference(a: torch.Tensor, bt: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                    perm: torch.Tensor | None, validate: bool = True) -> torch.Tensor:
    """Pure-PyTorch fedspa::sddmm: gather both rows of each nonzero and reduce, in chunks (the oracle)."""
    check_sddmm_inputs(SDDMM, a, bt, crow_indices, col_indices, perm, validate)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    rows = row_of_each_nonzero(crow_indices)
    cols = col_indices.long()
    in_csr_order = torch.empty(cols.numel(), dtype=acc, device=a.device)
    for start in range(0, cols.numel(), _CHUNK):
        stop = start + _CHUNK
        in_csr_order[start:stop] = (a[rows[start:stop]].to(acc) * bt[cols[start:stop]].to(acc)).sum(dim=1)
    if perm is None:
        return in_csr_order.to(a.dtype)
    out = torch.empty_like(in_csr_order)
    out[perm.long()] = in_csr_order
    return out.to(a.dtype)


def _fake(a, bt, crow_indices, col_indices, perm, validate=True):
    return a.new_empty(col_indices.shape[0])


def _triton(a, bt, crow_indices, col_indices, perm, validate=True):
    from ..triton_kernels.sddmm import sddmm_triton

    return sddmm_triton(a, bt, crow_indices, col_indices, perm, validate)


LIB.impl(SDDMM, sddmm_reference, "CompositeExplicitAutograd")
for _key in ("CPU", "CUDA"):
    LIB.impl(SDDMM + "_triton", _triton, _key)
torch.library.register_fake(f"fedspa::{SDDMM}", _fake, lib=LIB)
torch.library.register_fake(f"fedspa::{SDDMM}_triton", _fake, lib=LIB)
