"""Sparse masks: which weights are masked, per-tensor densities (ERK or uniform), personalized random masks.

Every parameter with two or more dimensions is masked (Linear, Conv*d of any groups, Embedding, the packed
``in_proj_weight`` of ``MultiheadAttention``, a custom module's weights); 1-D tensors (biases, normalization
parameters) and buffers stay dense. Masks are keyed by parameter name (``"features.0.weight"``). ERK (RigL, Evci
et al. 2020): a tensor's density is proportional to (sum of its dims) / (product of its dims), scaled so the
masked weights hold `density` of their total; a tensor whose density would exceed 1 is made dense and the scale
is recomputed for the rest. Uniform: every masked tensor at `density`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def maskable_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of every parameter with >= 2 dimensions, in ``named_parameters`` order."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.dim() >= 2}


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, method: str = "erk") -> dict[str, float]:
    """Per-tensor densities whose weighted mean over the masked weights is `density`."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if not shapes:
        return {}
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


def target_nnz(shapes: dict[str, tuple[int, ...]], densities: dict[str, float]) -> dict[str, int]:
    """round(density * n) per tensor, at least 1 and at most n."""
    return {name: min(math.prod(shape), max(1, int(round(densities[name] * math.prod(shape)))))
            for name, shape in shapes.items()}


def random_masks(shapes: dict[str, tuple[int, ...]], densities: dict[str, float], generator: torch.Generator,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """For each tensor, round(density * n) positions drawn uniformly without replacement (drawn on the CPU from
    `generator`, so the masks are the same on every device)."""
    masks = {}
    for name, nnz in target_nnz(shapes, densities).items():
        n = math.prod(shapes[name])
        flat = torch.zeros(n, dtype=torch.bool, device="cpu")
        flat[torch.randperm(n, generator=generator, device="cpu")[:nnz]] = True
        masks[name] = flat.reshape(shapes[name]).to(device)
    return masks


def client_generator(seed: int, client: int, purpose: int = 0, round_index: int = 0) -> torch.Generator:
    """The CPU generator of one (client, round, purpose): all randomness derives from these, so runs resume
    exactly and every device draws the same numbers."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + client * 10_007 + round_index * 101 + purpose) % (2**63 - 1))
    return g


def density_of(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0
