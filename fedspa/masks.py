"""Sparse masks: which weights are sparse, per-layer densities (ERK or uniform), personalized random masks.

The weights of Linear and Conv2d layers are sparsifiable; 1-D tensors (biases, normalization) stay dense. ERK
(RigL, Evci et al. 2020): a layer's density is proportional to (sum of its dims) / (product of its dims), scaled so
the sparsifiable weights hold `density` of their total; a layer whose density would exceed 1 is made dense and the
scale is recomputed for the rest. Uniform: every sparsifiable layer at `density`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sparsifiable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every Linear and Conv2d layer, in model order."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, method: str = "erk") -> dict[str, float]:
    """Per-layer densities whose weighted mean over the sparsifiable weights is `density`."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if method == "uniform" or density == 1.0:
        return {name: density for name in shapes}
    if method != "erk":
        raise ValueError(f"unknown mask init {method!r}; choose erk or uniform")
    dense: set[str] = set()
    while True:
        budget, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                budget -= n * (1.0 - density)
            else:
                budget += n * density
                raw[name] = sum(shape) / n
                divisor += raw[name] * n
        scale = budget / divisor
        largest = max(raw.values())
        if largest * scale <= 1.0:
            break
        dense |= {name for name, p in raw.items() if p == largest}
    return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}


def random_masks(shapes: dict[str, tuple[int, ...]], densities: dict[str, float],
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """For each layer, round(density * n) positions drawn uniformly without replacement."""
    masks = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        nnz = min(n, max(1, int(round(densities[name] * n))))
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:nnz]] = True
        masks[name] = flat.reshape(shape)
    return masks


def client_generator(seed: int, client: int, purpose: int = 0, round_index: int = 0) -> torch.Generator:
    """The generator of one (client, round, purpose): all randomness derives from these, so runs resume exactly."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + client * 10_007 + round_index * 101 + purpose) % (2**63 - 1))
    return g


def density_of(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0
