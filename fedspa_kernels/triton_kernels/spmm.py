"""Triton kernel of fedspa::spmm_triton: out (rows x N) = A (CSR) @ dense (cols x N); and of
fedspa::spmm_transposed_triton: out (cols x N) = A^T @ dense (rows x N), the same kernel over A's transposed order,
which the launcher builds for the call from the checked CSR pattern (one stable sort of the columns).

One program per (row, BLOCK_N output columns): the row's nonzeros are taken BLOCK_NZ at a time, their dense
rows gathered as a (BLOCK_NZ x BLOCK_N) tile and reduced against the values (elementwise products and a sum:
exact fp32, no TF32). The launcher checks the pattern (fedspa_kernels._checks) before the kernel reads through it.
Reference: fedspa_kernels/ops/spmm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_spmm_inputs, csr_transpose
from ._launch import accumulator, check_device

_BLOCK_NZ = 32
_BLOCK_N = 64


@triton.jit
def _spmm_kernel(values_ptr, crow_ptr, col_ptr, dense_ptr, out_ptr, n,
                 ACC: tl.constexpr, BLOCK_NZ: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < n
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        k_live = ks < end
        cols = tl.load(col_ptr + ks, mask=k_live, other=0).to(tl.int64)
        v = tl.load(values_ptr + ks, mask=k_live, other=0.0).to(ACC)
        tile = tl.load(dense_ptr + cols[:, None] * n + offs_n[None, :], mask=k_live[:, None] & n_live[None, :],
                       other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * tile, axis=0)
    tl.store(out_ptr + row * n + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_live)


def spmm_triton(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
    """Triton fedspa::spmm (same contract as the reference)."""
    check_spmm_inputs("spmm", values, crow_indices, col_indices, dense)
    check_device("spmm", values.device)
    rows = crow_indices.numel() - 1
    n = dense.shape[1]
    out = torch.empty((rows, n), dtype=dense.dtype, device=dense.device)
    if rows == 0 or n == 0:
        return out
    grid = (rows, triton.cdiv(n, _BLOCK_N))
    _spmm_kernel[grid](values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), dense.contiguous(),
                       out, n, ACC=accumulator(values.dtype), BLOCK_NZ=_BLOCK_NZ, BLOCK_N=_BLOCK_N)
    return out


def spmm_transposed_triton(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                           dense: torch.Tensor, cols: int) -> torch.Tensor:
    """Triton fedspa::spmm_transposed (same contract as the reference)."""
    check_spmm_inputs("spmm_transposed", values, crow_indices, col_indices, dense, cols)
    check_device("spmm_transposed", values.device)
    n = dense.shape[1]
    out = torch.empty((cols, n), dtype=dense.dtype, device=dense.device)
    if cols == 0 or n == 0:
        return out
    t_crow, t_col, values_t = csr_transpose(values, crow_indices, col_indices, cols)
    grid = (cols, triton.cdiv(n, _BLOCK_N))
    _spmm_kernel[grid](values_t.contiguous(), t_crow, t_col, dense.contiguous(), out, n,
                       ACC=accumulator(values.dtype), BLOCK_NZ=_BLOCK_NZ, BLOCK_N=_BLOCK_N)
    return out


def compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs) the launcher uses, for compile_check."""
    specs = []
    for dtype, acc in (("*fp16", tl.float32), ("*bf16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)):
        for col in ("*i16", "*i32"):  # a pattern's int16 or int32 columns; the transposed order's int32 rows
            signature = {"values_ptr": dtype, "crow_ptr": "*i64", "col_ptr": col, "dense_ptr": dtype,
                         "out_ptr": dtype, "n": "i64", "ACC": "constexpr", "BLOCK_NZ": "constexpr",
                         "BLOCK_N": "constexpr"}
            specs.append((_spmm_kernel, signature, {"ACC": acc, "BLOCK_NZ": _BLOCK_NZ, "BLOCK_N": _BLOCK_N}))
    return specs
