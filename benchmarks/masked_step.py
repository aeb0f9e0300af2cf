"""What masking a dense weight costs in a training step: the default CNN (Fashion-MNIST shapes, batch 128) at
FedSpa's default masks (ERK, density 0.5: the second conv and the first fc are masked), one SGD step (weight decay,
clipping) three ways, interleaved, median of the steps after a warm-up:

- ``dense``: no mask (what FedAvg runs);
- ``w * mask``: the mask applied in the forward as a product (a parametrization computing ``weight * mask``, how
  ``fedspa.nn.mask_in_forward`` worked until 2026-12-07);
- ``fedspa``: ``fedspa.nn.mask_in_forward`` as it is (the weight kept zero off the mask, only its gradient masked).

The last two must give the same weights to the last bit (checked after the timed steps).

    python benchmarks/masked_step.py [--threads 1,2] [--steps 60]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedspa.masks import layer_densities, maskable_parameters, random_masks
from fedspa.models import CNN
from fedspa.nn import WeightMask, mask_in_forward


class _ProductMask(WeightMask):
    """WeightMask as it was: the product in the forward (registering still zeroes the weight off the mask)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = CNN((1, 28, 28), 10)
    shapes = maskable_parameters(base)
    masks = random_masks(shapes, layer_densities(shapes, 0.5), torch.Generator().manual_seed(0))
    masks = {n: m for n, m in masks.items() if not bool(m.all())}
    product = copy.deepcopy(base)
    for name, mask in masks.items():
        parametrize.register_parametrization(product.get_submodule(name.rpartition(".")[0]), "weight",
                                             _ProductMask(mask))
    return {"dense": copy.deepcopy(base), "w * mask": product, "fedspa": mask_in_forward(copy.deepcopy(base), masks)}


def measure(threads: int, steps: int) -> dict[str, float]:
    """Median ms per training step of each way, at `threads` torch threads."""
    torch.set_num_threads(threads)
    models = _models()
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=5e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps):
        for name in list(models) if step % 2 else list(models)[::-1]:
            model, optimizer = models[name], optimizers[name]
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            times[name].append((time.perf_counter() - began) * 1e3)
    product = dict(models["w * mask"].named_parameters())
    ours = dict(models["fedspa"].named_parameters())
    if not all(torch.equal(product[n], ours[n]) for n in product):
        raise AssertionError("fedspa's masked weights left the w * mask trajectory")
    return {k: statistics.median(v[5:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.steps} steps each")
    print("| threads | dense ms | w * mask ms | fedspa ms | w * mask vs dense | fedspa vs dense |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in (int(t) for t in args.threads.split(",")):
        ms = measure(threads, args.steps)
        print(f"| {threads} | {ms['dense']:.1f} | {ms['w * mask']:.1f} | {ms['fedspa']:.1f} | "
              f"+{100 * (ms['w * mask'] / ms['dense'] - 1):.1f}% | +{100 * (ms['fedspa'] / ms['dense'] - 1):.1f}% |",
              flush=True)


if __name__ == "__main__":
    main()
