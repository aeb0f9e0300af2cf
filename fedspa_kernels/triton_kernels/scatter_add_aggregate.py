"""Triton kernels of fedspa::scatter_add_aggregate_triton and fedspa::scatter_add_average_triton.

One launch per client: each program loads BLOCK entries, atomically adds w * value and the coverage into the
dense outputs, and skips (never writes) entries whose index lies outside [0, n). The lowest offending
position per client is recorded with atomic_min, so the launcher can raise a ValueError naming it.
The average is a second, elementwise kernel. Reference: fedspa_kernels/ops/scatter_add_aggregate.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._checks import check_scatter_inputs as check_inputs
from .._checks import check_scatter_previous as check_previous
from .._checks import check_scatter_weights as check_weight_values
from .._checks import raise_first_invalid

AGGREGATE = "scatter_add_aggregate"
AVERAGE = "scatter_add_average"
from ._launch import check_device

_NONE = 2**63 - 1  # "no offending position" in the first-bad table
_BLOCK = 1024


@triton.jit
def _scatter_add_kernel(
    idx_ptr,
    val_ptr,
    weight_ptr,  # this client's weight (a 1-element view)
    sum_ptr,
    cov_ptr,
    first_bad_ptr,  # this client's [first bad index position, first non-finite position]
    num_entries,
    n,
    WEIGHTED_COV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < num_entries
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    w = tl.load(weight_ptr)
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(w.dtype)
    ok = live & (idx >= 0) & (idx < n)
    none = 9223372036854775807
    first_bad_index = tl.min(tl.where(live & ~ok, offs, none), axis=0)
    tl.atomic_min(first_bad_ptr, first_bad_index, mask=first_bad_index < none)
    non_finite = live & ((val != val) | (tl.abs(val) == float("inf")))
    first_non_finite = tl.min(tl.where(non_finite, offs, none), axis=0)
    tl.atomic_min(first_bad_ptr + 1, first_non_finite, mask=first_non_finite < none)
    tl.atomic_add(sum_ptr + idx, val * w, mask=ok)
    if WEIGHTED_COV:
        per_entry = tl.zeros_like(val) + w
    else:
        per_entry = tl.full(val.shape, 1.0, val.dtype)
    tl.atomic_add(cov_ptr + idx, per_entry, mask=ok)


@triton.jit
def _masked_average_kernel(sum_ptr, cov_ptr, prev_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    total = tl.load(sum_ptr + offs, mask=live, other=0.0)
    coverage = tl.load(cov_ptr + offs, mask=live, other=0.0)
    prev = tl.load(prev_ptr + offs, mask=live, other=0.0)
    held = coverage > 0
    average = tl.where(held, total / tl.where(held, coverage, 1.0), prev.to(total.dtype))
    tl.store(out_ptr + offs, average.to(out_ptr.dtype.element_ty), mask=live)


def _scatter(op: str, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], weights: torch.Tensor,
             n: int, weighted_coverage: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(op, indices, values, weights, n)
    check_weight_values(op, weights)
    check_device(op, weights.device)
    weights = weights.contiguous()
    total = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    coverage = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    first_bad = torch.full((2 * len(indices),), _NONE, dtype=torch.int64, device=weights.device)
    for c, (idx, val) in enumerate(zip(indices, values)):
        if idx.numel() == 0:
            continue
        grid = (triton.cdiv(idx.numel(), _BLOCK),)
        _scatter_add_kernel[grid](
            idx.contiguous(), val.contiguous(), weights[c:], total, coverage, first_bad[2 * c:], idx.numel(), n,
            WEIGHTED_COV=weighted_coverage, BLOCK=_BLOCK,
        )
    bad = first_bad.tolist()  # synchronizes: errors surface in this call
    raise_first_invalid(
        op, indices, values, n,
        [p if p != _NONE else None for p in bad[0::2]],
        [p if p != _NONE else None for p in bad[1::2]],
    )
    return total, coverage


def scatter_add_aggregate_triton(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                                 weights: torch.Tensor, n: int,
                                 weighted_coverage: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fedspa::scatter_add_aggregate (same contract as the reference)."""
    return _scatter(AGGREGATE, indices, values, weights, n, weighted_coverage)


def scatter_add_average_triton(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                               weights: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Triton fedspa::scatter_add_average (same contract as the reference)."""
    check_previous(AVERAGE, previous, weights)
    n = previous.numel()
    total, coverage = _scatter(AVERAGE, indices, values, weights, n, True)
    prev = previous.contiguous()
    out = torch.empty_like(prev)
    if n:
        _masked_average_kernel[(triton.cdiv(n, _BLOCK),)](total, coverage, prev, out, n, BLOCK=_BLOCK)
    return out


def compile_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for every dtype combination the launchers use; compiled for real GPU
    targets by ``python -m fedspa_kernels.triton_kernels.compile_check`` (no GPU needed)."""
    specs = []
    for idx in ("*i32", "*i64"):
        for val in ("*fp16", "*bf16", "*fp32", "*fp64"):
            for acc in ("*fp32", "*fp64"):
                signature = {"idx_ptr": idx, "val_ptr": val, "weight_ptr": acc, "sum_ptr": acc, "cov_ptr": acc,
                             "first_bad_ptr": "*i64", "num_entries": "i64", "n": "i64",
                             "WEIGHTED_COV": "constexpr", "BLOCK": "constexpr"}
                for weighted in (False, True):
                    specs.append((_scatter_add_kernel, signature, {"WEIGHTED_COV": weighted, "BLOCK": _BLOCK}))
    for acc in ("*fp32", "*fp64"):
        for out in ("*fp16", "*bf16", "*fp32", "*fp64"):
            signature = {"sum_ptr": acc, "cov_ptr": acc, "prev_ptr": out, "out_ptr": out, "n": "i64",
                         "BLOCK": "constexpr"}
            specs.append((_masked_average_kernel, signature, {"BLOCK": _BLOCK}))
    return specs

