"""Prune/regrow: FedSpa's mask update for every layer of a model in one call (a segmented top-k).

    fedspa::prune_regrow(Tensor[] weights, Tensor[] masks, Tensor[] scores, int[] drop_counts)
        -> (Tensor[] new_masks, Tensor[] pruned, Tensor[] regrown)

For each layer l, with k = drop_counts[l]:
  - prune: among active positions (mask True), the k with the smallest |weight|;
  - regrow: among positions inactive before this update (so the just-pruned ones are excluded), the k with the
    largest score (|gradient|, or a random score);
  - new_mask = mask without the pruned positions, plus the regrown ones: nnz is unchanged.
Ties are broken by the lowest flat index, so every backend returns the identical mask. ``pruned[l]`` and
``regrown[l]`` are the flat (row-major) int64 positions, ascending. A NaN |weight| at an active position or a
NaN score at an inactive one is an error, as is k larger than the active or the inactive count.
Kernels: the reference below (torch.topk per layer), C++ CPU and CUDA (csrc/*/prune_regrow.*: radix select,
no sort), Triton (triton_kernels/prune_regrow.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._backends import resolve_backend
from .._checks import check_drop_counts, check_prune_regrow_counts, check_prune_regrow_inputs
from .._op import KernelOp

PRUNE_REGROW = "prune_regrow"


class PruneRegrowResult(NamedTuple):
    """New masks, and per layer the flat positions pruned and regrown (int64, ascending)."""

    masks: list[torch.Tensor]
    pruned: list[torch.Tensor]
    regrown: list[torch.Tensor]


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _select(keys: torch.Tensor, candidates: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k candidates with the smallest (largest) keys, ties to the lowest index; ascending positions."""
    if k == 0:
        return candidates.new_empty(0)
    values = keys[candidates]
    top = torch.topk(values, k, largest=largest, sorted=False).values
    kth = top.min() if largest else top.max()
    strict = candidates[values > kth] if largest else candidates[values < kth]
    ties = candidates[values == kth][: k - strict.numel()]
    return torch.cat([strict, ties]).sort().values


def prune_regrow_reference(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                           scores: Sequence[torch.Tensor],
                           drop_counts: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Pure-PyTorch fedspa::prune_regrow: torch.topk per layer, ties resolved by index."""
    check_prune_regrow_inputs(PRUNE_REGROW, weights, masks, scores, drop_counts)
    plans = []
    for l, (w, m, s, k) in enumerate(zip(weights, masks, scores, drop_counts)):
        flat_mask = m.reshape(-1)
        active = flat_mask.nonzero().squeeze(1)
        inactive = (~flat_mask).nonzero().squeeze(1)
        check_prune_regrow_counts(PRUNE_REGROW, l, k, active.numel(), inactive.numel())
        magnitude = w.reshape(-1).abs().float() if w.dtype != torch.float64 else w.reshape(-1).abs()
        score = s.reshape(-1).float() if s.dtype != torch.float64 else s.reshape(-1)
        bad = magnitude[active].isnan()
        if bad.any():
            raise ValueError(f"{PRUNE_REGROW}: layer {l} has a NaN weight at active position {int(active[_first(bad)])}")
        bad = score[inactive].isnan()
        if bad.any():
            raise ValueError(f"{PRUNE_REGROW}: layer {l} has a NaN score at inactive position "
                             f"{int(inactive[_first(bad)])}")
        plans.append((magnitude, score, active, inactive, k))
    new_masks, pruned, regrown = [], [], []
    for m, (magnitude, score, active, inactive, k) in zip(masks, plans):
        drop = _select(magnitude, active, k, largest=False)
        grow = _select(score, inactive, k, largest=True)
        flat = m.reshape(-1).clone()
        flat[drop] = False
        flat[grow] = True
        new_masks.append(flat.reshape(m.shape))
        pruned.append(drop)
        regrown.append(grow)
    return new_masks, pruned, regrown


def _fake(weights, masks, scores, drop_counts):
    return ([torch.empty_like(m) for m in masks],
            [m.new_empty(k, dtype=torch.int64) for m, k in zip(masks, drop_counts)],
            [m.new_empty(k, dtype=torch.int64) for m, k in zip(masks, drop_counts)])


PRUNE_REGROW_OP = KernelOp(
    PRUNE_REGROW,
    "(Tensor[] weights, Tensor[] masks, Tensor[] scores, int[] drop_counts) -> "
    "(Tensor[] new_masks, Tensor[] pruned, Tensor[] regrown)",
    reference=prune_regrow_reference, fake=_fake,
    triton="fedspa_kernels.triton_kernels.prune_regrow:prune_regrow_triton")


def prune_regrow(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                 drop_counts: Sequence[int] | torch.Tensor, backend: str | None = None, *,
                 return_indices: bool = False) -> list[torch.Tensor] | PruneRegrowResult:
    """FedSpa's mask update for all layers at once: drop the k_l smallest |w| among each layer's active
    weights and grow the k_l largest scores among its inactive positions (ties: lowest index first).

    Args:
        weights: per layer, the (dense-shaped) weights; any floating dtype.
        masks: per layer, the bool mask of active weights, shaped like the weights.
        scores: per layer, the regrowth score (|gradient|, or random), shaped like the weights.
        drop_counts: per layer, how many to prune and regrow (k_l >= 0).
        backend: None (best available), "reference", "cpp", "cuda" or "triton".
        return_indices: also return the pruned and regrown flat positions.

    Returns:
        The new masks (nnz per layer unchanged); with ``return_indices``, a PruneRegrowResult
        ``(masks, pruned, regrown)``. Regrown weights are meant to start at zero.
    """
    weights, masks, scores = list(weights), list(masks), list(scores)
    for name, seq in (("weights", weights), ("masks", masks), ("scores", scores)):
        if not all(isinstance(t, torch.Tensor) for t in seq):
            raise TypeError(f"{PRUNE_REGROW}: {name} must be a sequence of tensors, one per layer")
    counts = check_drop_counts(PRUNE_REGROW, drop_counts)
    check_prune_regrow_inputs(PRUNE_REGROW, weights, masks, scores, counts)
    if not weights:
        return PruneRegrowResult([], [], []) if return_indices else []
    chosen = resolve_backend(backend, weights[0].device, PRUNE_REGROW)
    result = PRUNE_REGROW_OP.kernel(chosen)(weights, masks, scores, counts)
    new_masks, pruned, regrown = (list(part) for part in result)
    return PruneRegrowResult(new_masks, pruned, regrown) if return_indices else new_masks
