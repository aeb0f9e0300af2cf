"""Triton kernel of fedspa::sddmm_triton: out[k] = dot(a[r_k, :], bt[c_k, :]) at a CSR pattern.

One program per row: its nonzeros are taken BLOCK_NZ at a time; for each K block, the row's slice of a and the
gathered (BLOCK_NZ x BLOCK_K) slices of bt are multiplied and reduced (exact fp32, no TF32). The launcher checks
the pattern (fedspa_kernels._checks) before the kernel reads through it. Reference: fedspa_kernels/ops/sddmm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_sddmm_inputs
from ._launch import accumulator, check_device

_BLOCK_NZ = 32
_BLOCK_K = 64


@triton.jit
def _sddmm_kernel(a_ptr, bt_ptr, crow_ptr, col_ptr, out_ptr, k_dim,
                  ACC: tl.constexpr, BLOCK_NZ: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        k_live = ks < end
        cols = tl.load(col_ptr + ks, mask=k_live, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_NZ,), dtype=ACC)
        for j0 in range(0, k_dim, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            j_live = offs_j < k_dim
            a_slice = tl.load(a_ptr + row * k_dim + offs_j, mask=j_live, other=0.0).to(ACC)
            b_tile = tl.load(bt_ptr + cols[:, None] * k_dim + offs_j[None, :],
                             mask=k_live[:, None] & j_live[None, :], other=0.0).to(ACC)
            acc += tl.sum(a_slice[None, :] * b_tile, axis=1)
        tl.store(out_ptr + ks, acc.to(out_ptr.dtype.element_ty), mask=k_live)


def sddmm_triton(a: torch.Tensor, bt: torch.Tensor, crow_indices: torch.Tensor,
                 col_indices: torch.Tensor) -> torch.Tensor:
    """Triton fedspa::sddmm (same contract as the reference)."""
    check_sddmm_inputs("sddmm", a, bt, crow_indices, col_indices)
    check_device("sddmm", a.device)
    out = torch.empty(col_indices.numel(), dtype=a.dtype, device=a.device)
    rows = a.shape[0]
    if rows == 0 or out.numel() == 0:
        return out
    _sddmm_kernel[(rows,)](a.contiguous(), bt.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), out,
                           a.shape[1], ACC=accumulator(a.dtype), BLOCK_NZ=_BLOCK_NZ, BLOCK_K=_BLOCK_K)
    return out


def compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs) the launcher uses, for compile_check."""
    specs = []
    for dtype, acc in (("*fp16", tl.float32), ("*bf16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)):
        for col in ("*i16", "*i32"):
            signature = {"a_ptr": dtype, "bt_ptr": dtype, "crow_ptr": "*i64", "col_ptr": col, "out_ptr": dtype,
                         "k_dim": "i64", "ACC": "constexpr", "BLOCK_NZ": "constexpr", "BLOCK_K": "constexpr"}
            specs.append((_sddmm_kernel, signature, {"ACC": acc, "BLOCK_NZ": _BLOCK_NZ, "BLOCK_K": _BLOCK_K}))
    return specs
