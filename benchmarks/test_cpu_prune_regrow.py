"""CPU benchmark: FedSpa's mask update (prune + regrow) of a whole ResNet-18 in one call vs torch.topk.

62 tensors, 11.17M weights, densities 0.5 and 0.1, every layer dropping (and regrowing) 10% of its active weights.
Baseline: what one writes with PyTorch, per layer two torch.topk calls on the full tensors (|w| with inactive
positions at +inf, scores with active positions at -inf) and a mask update. Peer: fedspa's reference (torch.topk on
the candidates, ties broken by index). A probe reads every input once in the same session, the floor to compare
with.

Run:  pytest benchmarks/test_cpu_prune_regrow.py --benchmark-json=bench.json && python benchmarks/report.py bench.json
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fedspa_kernels as fk

sys.path.insert(0, os.path.dirname(__file__))
from model_shapes import resnet18_shapes  # noqa: E402

DENSITIES = [float(d) for d in os.environ.get("FEDSPA_BENCH_DENSITIES", "0.5,0.1").split(",")]
SCALE = int(os.environ.get("FEDSPA_BENCH_SCALE", 1))  # divide every dimension-0 size (tests use a small model)
DROP = 0.1

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")

_MODELS: dict = {}


def _model(density: float):
    if density not in _MODELS:
        _MODELS.clear()
        g = torch.Generator().manual_seed(int(density * 1000))
        shapes = [(max(1, s[0] // SCALE), *s[1:]) for s in resnet18_shapes()]
        weights = [torch.randn(s, generator=g) for s in shapes]
        masks = [torch.rand(s, generator=g) < density for s in shapes]
        scores = [torch.rand(s, generator=g) for s in shapes]
        counts = [min(int(round(DROP * int(m.sum()))), int((~m).sum())) for m in masks]
        _MODELS[density] = (weights, masks, scores, counts)
    return _MODELS[density]


def topk_loop(weights, masks, scores, counts):
    """The baseline: two torch.topk per layer and a mask update."""
    new_masks = []
    for w, m, s, k in zip(weights, masks, scores, counts):
        magnitude = w.abs().masked_fill(~m, float("inf")).reshape(-1)
        drop = torch.topk(magnitude, k, largest=False).indices
        grow = torch.topk(s.masked_fill(m, float("-inf")).reshape(-1), k).indices
        new = m.clone().reshape(-1)
        new[drop] = False
        new[grow] = True
        new_masks.append(new.reshape(m.shape))
    return new_masks


IMPLEMENTATIONS = {
    "torch.topk loop": ("baseline", topk_loop),
    "fedspa reference": ("peer", lambda *a: fk.prune_regrow(*a, backend="reference")),
    "fedspa cpp": ("ours", lambda *a: fk.prune_regrow(*a, backend="cpp")),
}


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("density", DENSITIES)
def test_prune_regrow(benchmark, density, implementation):
    weights, masks, scores, counts = _model(density)
    role, fn = IMPLEMENTATIONS[implementation]
    n = sum(w.numel() for w in weights)
    benchmark.group = f"prune+regrow resnet18 d={density}"
    benchmark.extra_info.update({"role": role, "implementation": implementation, "density": density,
                                 "tensors": len(weights), "weights": n, "drop_fraction": DROP,
                                 "bytes": n * (4 + 4 + 1 + 1)})  # weights, scores, mask read; new mask written
    rounds = 3 if role != "ours" else 15
    result = benchmark.pedantic(fn, args=(weights, masks, scores, counts), rounds=rounds, warmup_rounds=1)
    if role == "ours":
        reference = fk.prune_regrow(weights, masks, scores, counts, backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(result, reference))


@pytest.mark.parametrize("density", DENSITIES[:1])
def test_read_inputs_once(benchmark, density):
    """The floor: reading every weight, score and mask once."""
    weights, masks, scores, _ = _model(density)
    n = sum(w.numel() for w in weights)
    benchmark.group = "memory bandwidth"
    benchmark.extra_info.update({"role": "probe", "implementation": "read all inputs (sums)", "bytes": n * 9})

    def read():
        return [(w.sum(), s.sum(), m.sum()) for w, m, s in zip(weights, masks, scores)]

    benchmark.pedantic(read, rounds=15, warmup_rounds=2)
