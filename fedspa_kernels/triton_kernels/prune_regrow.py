"""Triton kernels of fedspa::prune_regrow_triton: the segmented radix select of every layer at once.

The layers are concatenated into flat buffers (one copy, cheap on a GPU) and cut into blocks of BLOCK elements
that never cross a layer (a block table), so a 10-element bias and a 2.4M-element convolution both keep the GPU
busy in the same launches. Each element gets one order-preserving key (|w| where active; the negated score where
inactive; fp64 inputs use 64-bit keys) and a selection (0: prune, 1: regrow). Then:
  - a digit pass per 11-bit digit: per-block histograms (tl.histogram) of keys matching each selection's prefix,
    atomically added per layer; the bin holding the k-th key is chosen for all layers with a few torch ops;
  - a count pass: per block, keys below each threshold and keys equal to it;
  - a write pass: new masks, and the picked positions, placed by per-layer scans of the block counts and in-block
    cumulative sums, ties taken lowest index first.
Reference: fedspa_kernels/ops/prune_regrow.py; C++/CUDA twins: csrc/*/prune_regrow.*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._checks import check_prune_regrow_counts as check_counts
from .._checks import check_prune_regrow_inputs as check_inputs
from ._launch import check_device

_BLOCK = 1024
_DIGIT_BITS = 11
_BINS = 1 << _DIGIT_BITS
_NONE = 2**62


@triton.jit
def _keys(w_ptr, s_ptr, m_ptr, offs, live, UINT: tl.constexpr, KEY_BITS: tl.constexpr):
    """Keys and selections of elements offs (0: active -> prune by |w|, 1: inactive -> regrow by score)."""
    active = tl.load(m_ptr + offs, mask=live, other=0) != 0
    w = tl.load(w_ptr + offs, mask=live, other=0.0)
    s = tl.load(s_ptr + offs, mask=live, other=0.0)
    sign = tl.full(w.shape, 1, UINT) << (KEY_BITS - 1)
    ones = sign | (sign - 1)  # (built without ~, which the interpreter cannot apply to unsigned tensors)
    magnitude = w.to(UINT, bitcast=True) & (sign - 1)
    bits = tl.where(s == 0, tl.zeros_like(sign), s.to(UINT, bitcast=True))  # -0 ties with +0
    ascending = bits ^ tl.where((bits & sign) != 0, ones, sign)
    key = tl.where(active, magnitude, ascending ^ ones)  # descending score for regrowth
    return key, active, w, s


@triton.jit
def _first_digit_kernel(w_ptr, s_ptr, m_ptr, block_seg_ptr, block_start_ptr, seg_end_ptr, seg_start_ptr, hist_ptr,
                        active_ptr, first_nan_ptr, UINT: tl.constexpr, KEY_BITS: tl.constexpr,
                        DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    offs = start + tl.arange(0, BLOCK)
    live = offs < tl.load(seg_end_ptr + seg)
    key, active, w, s = _keys(w_ptr, s_ptr, m_ptr, offs, live, UINT, KEY_BITS)
    bins: tl.constexpr = 1 << DIGIT_BITS
    digit = (key >> (KEY_BITS - DIGIT_BITS)).to(tl.int32)
    index = digit + tl.where(active, 0, bins)
    hist = tl.histogram(index, 2 * bins, mask=live)
    tl.atomic_add(hist_ptr + seg * 2 * bins + tl.arange(0, 2 * bins), hist)
    tl.atomic_add(active_ptr + seg, tl.sum((active & live).to(tl.int64), axis=0))
    local = offs - tl.load(seg_start_ptr + seg)
    none = 4611686018427387904
    nan_w = tl.min(tl.where(live & active & (w != w), local, none), axis=0)
    nan_s = tl.min(tl.where(live & ~active & (s != s), local, none), axis=0)
    tl.atomic_min(first_nan_ptr + seg * 2, nan_w, mask=nan_w < none)
    tl.atomic_min(first_nan_ptr + seg * 2 + 1, nan_s, mask=nan_s < none)


@triton.jit
def _digit_kernel(w_ptr, s_ptr, m_ptr, block_seg_ptr, block_start_ptr, seg_end_ptr, prefix_ptr, hist_ptr, shift,
                  high, UINT: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the digit at `shift` among keys whose bits above `high` match their selection's prefix."""
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    offs = start + tl.arange(0, BLOCK)
    live = offs < tl.load(seg_end_ptr + seg)
    key, active, w, s = _keys(w_ptr, s_ptr, m_ptr, offs, live, UINT, KEY_BITS)
    prefix = tl.where(active, tl.load(prefix_ptr + seg * 2).to(UINT, bitcast=True),
                      tl.load(prefix_ptr + seg * 2 + 1).to(UINT, bitcast=True))
    match = live & ((key >> high) == (prefix >> high))
    bins: tl.constexpr = 1 << DIGIT_BITS
    digit = ((key >> shift) & (bins - 1)).to(tl.int32)
    hist = tl.histogram(digit + tl.where(active, 0, bins), 2 * bins, mask=match)
    tl.atomic_add(hist_ptr + seg * 2 * bins + tl.arange(0, 2 * bins), hist)


@triton.jit
def _count_kernel(w_ptr, s_ptr, m_ptr, block_seg_ptr, block_start_ptr, seg_end_ptr, threshold_ptr, counts_ptr,
                  UINT: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Per block and selection: keys below the threshold, keys equal to it."""
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    offs = start + tl.arange(0, BLOCK)
    live = offs < tl.load(seg_end_ptr + seg)
    key, active, w, s = _keys(w_ptr, s_ptr, m_ptr, offs, live, UINT, KEY_BITS)
    t_prune = tl.load(threshold_ptr + seg * 2).to(UINT, bitcast=True)
    t_grow = tl.load(threshold_ptr + seg * 2 + 1).to(UINT, bitcast=True)
    t = tl.where(active, t_prune, t_grow)
    below = live & (key < t)
    equal = live & (key == t)
    tl.store(counts_ptr + pid * 4 + 0, tl.sum((below & active).to(tl.int64), axis=0))
    tl.store(counts_ptr + pid * 4 + 1, tl.sum((below & ~active).to(tl.int64), axis=0))
    tl.store(counts_ptr + pid * 4 + 2, tl.sum((equal & active).to(tl.int64), axis=0))
    tl.store(counts_ptr + pid * 4 + 3, tl.sum((equal & ~active).to(tl.int64), axis=0))


@triton.jit
def _write_kernel(w_ptr, s_ptr, m_ptr, block_seg_ptr, block_start_ptr, seg_end_ptr, seg_start_ptr, threshold_ptr,
                  need_ptr, take_ptr, out_mask_ptr, pruned_ptr, regrown_ptr, UINT: tl.constexpr,
                  KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """New mask bytes and picked positions. take_ptr[block*4 + {0,1,2,3}]: ties of each selection before this
    block in its layer, and where this block's picks of each selection go in the flat outputs."""
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    offs = start + tl.arange(0, BLOCK)
    live = offs < tl.load(seg_end_ptr + seg)
    key, active, w, s = _keys(w_ptr, s_ptr, m_ptr, offs, live, UINT, KEY_BITS)
    t = tl.where(active, tl.load(threshold_ptr + seg * 2).to(UINT, bitcast=True),
                 tl.load(threshold_ptr + seg * 2 + 1).to(UINT, bitcast=True))
    need = tl.where(active, tl.load(need_ptr + seg * 2), tl.load(need_ptr + seg * 2 + 1))
    ties_before = tl.where(active, tl.load(take_ptr + pid * 4 + 0), tl.load(take_ptr + pid * 4 + 1))
    equal = live & (key == t)
    equal_p = (equal & active).to(tl.int64)
    equal_g = (equal & ~active).to(tl.int64)
    tie_rank = ties_before + tl.where(active, tl.cumsum(equal_p, axis=0) - equal_p, tl.cumsum(equal_g, axis=0) - equal_g)
    pick = live & ((key < t) | (equal & (tie_rank < need)))
    tl.store(out_mask_ptr + offs, (active != pick).to(tl.uint8), mask=live)
    pick_p = (pick & active).to(tl.int64)
    pick_g = (pick & ~active).to(tl.int64)
    local = offs - tl.load(seg_start_ptr + seg)
    at_p = tl.load(take_ptr + pid * 4 + 2) + tl.cumsum(pick_p, axis=0) - pick_p
    at_g = tl.load(take_ptr + pid * 4 + 3) + tl.cumsum(pick_g, axis=0) - pick_g
    tl.store(pruned_ptr + at_p, local, mask=pick & active)
    tl.store(regrown_ptr + at_g, local, mask=pick & ~active)


def _segment_exclusive_cumsum(values: torch.Tensor, first_block: torch.Tensor, block_seg: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums of per-block values (blocks x c), restarting at each layer's first block."""
    inclusive = values.cumsum(0)
    exclusive = inclusive - values
    return exclusive - exclusive[first_block[block_seg]]


def prune_regrow_triton(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                        drop_counts: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Triton fedspa::prune_regrow (same contract as the reference)."""
    check_inputs("prune_regrow", weights, masks, scores, drop_counts)
    layers = len(weights)
    if layers == 0:
        return [], [], []
    device = weights[0].device
    check_device("prune_regrow", device)
    wide = any(t.dtype == torch.float64 for t in (*weights, *scores))
    compute = torch.float64 if wide else torch.float32
    uint, key_bits = (tl.uint64, 64) if wide else (tl.uint32, 32)
    sizes = [w.numel() for w in weights]
    flat_w = torch.cat([w.reshape(-1).to(compute) for w in weights])
    flat_s = torch.cat([s.reshape(-1).to(compute) for s in scores])
    flat_m = torch.cat([m.reshape(-1) for m in masks]).view(torch.uint8)
    counts_k = torch.tensor(drop_counts, dtype=torch.int64)
    seg_start_cpu = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    seg_start, seg_end = seg_start_cpu[:-1].to(device), seg_start_cpu[1:].to(device)
    blocks_per_seg = [triton.cdiv(n, _BLOCK) for n in sizes]
    block_seg_cpu = torch.repeat_interleave(torch.arange(layers), torch.tensor(blocks_per_seg))
    first_block_cpu = torch.tensor([0, *blocks_per_seg], dtype=torch.int64).cumsum(0)[:-1]
    block_start_cpu = seg_start_cpu[block_seg_cpu] + (torch.arange(len(block_seg_cpu)) - first_block_cpu[block_seg_cpu]) * _BLOCK
    block_seg, block_start = block_seg_cpu.to(device), block_start_cpu.to(device)
    first_block = first_block_cpu.to(device)
    num_blocks = len(block_seg_cpu)
    grid = (num_blocks,)
    common = dict(UINT=uint, KEY_BITS=key_bits, BLOCK=_BLOCK)

    hist = torch.zeros(layers, 2, _BINS, dtype=torch.int32, device=device)
    active = torch.zeros(layers, dtype=torch.int64, device=device)
    first_nan = torch.full((layers, 2), _NONE, dtype=torch.int64, device=device)
    if num_blocks:
        _first_digit_kernel[grid](flat_w, flat_s, flat_m, block_seg, block_start, seg_end, seg_start, hist, active,
                                  first_nan, DIGIT_BITS=_DIGIT_BITS, **common)
    active_cpu, nan_cpu = active.cpu(), first_nan.cpu()  # the one synchronization: errors are raised here
    for layer, (n, k) in enumerate(zip(sizes, drop_counts)):
        check_counts("prune_regrow", layer, k, int(active_cpu[layer]), n - int(active_cpu[layer]))
        if int(nan_cpu[layer, 0]) != _NONE:
            raise ValueError(f"prune_regrow: layer {layer} has a NaN weight at active position "
                             f"{int(nan_cpu[layer, 0])}")
        if int(nan_cpu[layer, 1]) != _NONE:
            raise ValueError(f"prune_regrow: layer {layer} has a NaN score at inactive position "
                             f"{int(nan_cpu[layer, 1])}")

    need = counts_k.to(device)[:, None].repeat(1, 2)  # (layers, 2): keys still to take
    prefix = torch.zeros(layers, 2, dtype=torch.int64, device=device)  # threshold bits found so far
    key_sized = (lambda t: t) if wide else (lambda t: t.to(torch.int32))  # bit patterns in the key's width
    digits = -(-key_bits // _DIGIT_BITS)
    for digit in range(digits):
        shift = max(0, key_bits - _DIGIT_BITS * (digit + 1))
        if digit > 0:
            hist.zero_()
            if num_blocks:
                _digit_kernel[grid](flat_w, flat_s, flat_m, block_seg, block_start, seg_end, key_sized(prefix), hist, shift,
                                    key_bits - _DIGIT_BITS * digit, DIGIT_BITS=_DIGIT_BITS, **common)
        cumulative = hist.to(torch.int64).cumsum(-1)
        chosen = (cumulative < need[..., None]).sum(-1).clamp_max(_BINS - 1)  # first bin reaching `need`
        before = torch.where(chosen > 0, cumulative.gather(-1, (chosen - 1).clamp_min(0)[..., None])[..., 0], 0)
        need = torch.where(need > 0, need - before, need)
        prefix = prefix | (chosen << shift)
    threshold = key_sized(prefix)

    counts = torch.zeros(num_blocks, 4, dtype=torch.int64, device=device)
    if num_blocks:
        _count_kernel[grid](flat_w, flat_s, flat_m, block_seg, block_start, seg_end, threshold, counts, **common)
    below, ties = counts[:, :2], counts[:, 2:]
    ties_before = _segment_exclusive_cumsum(ties, first_block, block_seg)
    taken = (need[block_seg] - ties_before).clamp(min=0).minimum(ties)
    picks = below + taken
    k_offset = torch.tensor([0, *drop_counts], dtype=torch.int64).cumsum(0)[:-1].to(device)
    pick_at = _segment_exclusive_cumsum(picks, first_block, block_seg) + k_offset[block_seg][:, None]
    take = torch.cat([ties_before, pick_at], dim=1).contiguous()
    out_mask = torch.empty_like(flat_m)
    pruned = torch.empty(int(counts_k.sum()), dtype=torch.int64, device=device)
    regrown = torch.empty_like(pruned)
    if num_blocks:
        _write_kernel[grid](flat_w, flat_s, flat_m, block_seg, block_start, seg_end, seg_start, threshold, need,
                            take, out_mask, pruned, regrown, **common)
    # separate tensors: a custom op's outputs must not alias each other
    new_masks = [part.view(torch.bool).reshape(m.shape).clone() for part, m in zip(out_mask.split(sizes), masks)]
    return (new_masks, [part.clone() for part in pruned.split(list(drop_counts))],
            [part.clone() for part in regrown.split(list(drop_counts))])


def compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs) the launcher uses, for compile_check."""
    specs = []
    for fp, uint, bits, key in (("*fp32", tl.uint32, 32, "*i32"), ("*fp64", tl.uint64, 64, "*i64")):
        base = {"w_ptr": fp, "s_ptr": fp, "m_ptr": "*u8", "block_seg_ptr": "*i64", "block_start_ptr": "*i64",
                "seg_end_ptr": "*i64"}
        consts = {"UINT": uint, "KEY_BITS": bits, "BLOCK": _BLOCK}
        specs.append((_first_digit_kernel,
                      {**base, "seg_start_ptr": "*i64", "hist_ptr": "*i32", "active_ptr": "*i64",
                       "first_nan_ptr": "*i64", "UINT": "constexpr", "KEY_BITS": "constexpr",
                       "DIGIT_BITS": "constexpr", "BLOCK": "constexpr"},
                      {**consts, "DIGIT_BITS": _DIGIT_BITS}))
        specs.append((_digit_kernel,
                      {**base, "prefix_ptr": key, "hist_ptr": "*i32", "shift": "i32", "high": "i32",
                       "UINT": "constexpr", "KEY_BITS": "constexpr", "DIGIT_BITS": "constexpr", "BLOCK": "constexpr"},
                      {**consts, "DIGIT_BITS": _DIGIT_BITS}))
        specs.append((_count_kernel,
                      {**base, "threshold_ptr": key, "counts_ptr": "*i64", "UINT": "constexpr",
                       "KEY_BITS": "constexpr", "BLOCK": "constexpr"}, consts))
        specs.append((_write_kernel,
                      {**base, "seg_start_ptr": "*i64", "threshold_ptr": key, "need_ptr": "*i64",
                       "take_ptr": "*i64", "out_mask_ptr": "*u8", "pruned_ptr": "*i64", "regrown_ptr": "*i64",
                       "UINT": "constexpr", "KEY_BITS": "constexpr", "BLOCK": "constexpr"}, consts))
    return specs
