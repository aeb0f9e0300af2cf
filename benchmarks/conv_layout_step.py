"""ms per training step of a SparseConv2d on NCHW activations, alone and followed by GroupNorm and ReLU (ResNet-18's
pattern), at ResNet-18's stage-1 shape (64 -> 64, 32x32, 3x3, padding 1).

What it isolates: the layout changes around the C++ kernels (the input, output and gradients move between NCHW and
the kernels' (C, H, W, N)) and how the next op reads the output. For A/B comparisons of two checkouts run it from
outside both with PYTHONPATH set to each, alternating:

    cd /tmp && PYTHONPATH=<checkout> python <main>/benchmarks/conv_layout_step.py --batch 128 --densities 0.05,0.1

Prints one JSON line per (density, step): the median of --repeats steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def _median_ms(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--densities", default="0.05,0.1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fedspa.nn import SparseConv2d

    for density in (float(d) for d in args.densities.split(",")):
        generator = torch.Generator().manual_seed(0)
        dense = nn.Conv2d(64, 64, 3, padding=1)
        mask = torch.rand(dense.weight.shape, generator=generator) < density
        conv = SparseConv2d.from_dense(dense, mask, backend="cpp")
        x = torch.randn(args.batch, 64, 32, 32, generator=generator, requires_grad=True)
        dy = torch.randn(args.batch, 64, 32, 32, generator=generator)  # an NCHW gradient, as the next op's
        for name, net in (("conv", conv), ("conv+groupnorm+relu", nn.Sequential(conv, nn.GroupNorm(2, 64),
                                                                                 nn.ReLU()))):
            def step(net=net):
                x.grad = None
                for p in net.parameters():
                    p.grad = None
                net(x).backward(dy)
            print(json.dumps({"step": name, "density": density, "batch": args.batch, "threads": args.threads,
                              "ms": round(_median_ms(step, args.repeats), 2)}), flush=True)


if __name__ == "__main__":
    main()
