"""Triton kernel of fedspa::transpose_copy_triton: out (cols x rows, row-major) = x.t() for a 2-D x.

Each program moves one BLOCK_R x BLOCK_C tile: it loads the tile through x's strides and stores its transpose into
out. The grid is one-dimensional (tile = row tile x column tiles + column tile), so no grid axis limit binds.
Reference: fedspa_kernels/ops/transpose_copy.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_transpose_input
from ._launch import check_device

_BLOCK_R = 32
_BLOCK_C = 32


@triton.jit
def _transpose_copy_kernel(x_ptr, out_ptr, rows, cols, stride_r, stride_c, col_tiles,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    live = (r[:, None] < rows) & (c[None, :] < cols)
    tile = tl.load(x_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=live)
    tl.store(out_ptr + c[:, None] * rows + r[None, :], tl.trans(tile), mask=tl.trans(live))


def transpose_copy_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton fedspa::transpose_copy (same contract as the reference)."""
    check_transpose_input("transpose_copy", x)
    check_device("transpose_copy", x.device)
    rows, cols = x.shape
    out = torch.empty(cols, rows, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    col_tiles = triton.cdiv(cols, _BLOCK_C)
    grid = (triton.cdiv(rows, _BLOCK_R) * col_tiles,)
    _transpose_copy_kernel[grid](x, out, rows, cols, x.stride(0), x.stride(1), col_tiles,
                                 BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    return out


def compile_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for every dtype the launcher uses; compiled for real GPU targets by
    ``python -m fedspa_kernels.triton_kernels.compile_check`` (no GPU needed)."""
    specs = []
    for dtype in ("*fp16", "*bf16", "*fp32", "*fp64"):
        signature = {"x_ptr": dtype, "out_ptr": dtype, "rows": "i64", "cols": "i64", "stride_r": "i64",
                     "stride_c": "i64", "col_tiles": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        specs.append((_transpose_copy_kernel, signature, {"BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C}))
    return specs
