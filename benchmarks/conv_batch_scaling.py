"""How the sparse convolution's C++ kernels scale with the batch: ms per sample of the forward, the input gradient
and the weight gradient alone (no layout copies), on ResNet-18's stage-1 shape (64 -> 64 channels, 32x32, 3x3,
stride 1, padding 1) at one density, activations already in the kernels' (C, H, W, N) layout; median of 5 calls
after one warm-up, 1 thread by default.

    python benchmarks/conv_batch_scaling.py [--batches 16,32,64,96,112,120,128,136,144] [--density 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fedspa_kernels as fk
from fedspa_kernels.ops import sparse_conv2d as sc


def per_sample_ms(batch: int, matrix: fk.SparseMatrix, generator: torch.Generator) -> tuple[float, float, float]:
    """(forward, input gradient, weight gradient) ms per sample at `batch`."""
    x = torch.randn(64, 32, 32, batch, generator=generator)
    dy = torch.randn(64, 32, 32, batch, generator=generator)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    calls = (
        lambda: sc.SPARSE_CONV2D.kernel("cpp")(matrix.values, matrix.crow_indices, matrix.col_indices, x, *geometry),
        lambda: sc.SPARSE_CONV2D_INPUT_GRAD.kernel("cpp")(matrix.values, matrix.crow_indices, matrix.col_indices, dy,
                                                          [64, 32, 32], *geometry),
        lambda: sc.SPARSE_CONV2D_WEIGHT_GRAD.kernel("cpp")(dy, x, matrix.crow_indices, matrix.col_indices, *geometry),
    )
    result = []
    for call in calls:
        call()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
        result.append(statistics.median(times) * 1e3 / batch)
    return result[0], result[1], result[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,32,64,96,112,120,128,136,144")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not fk.available_backends()["cpp"]:
        raise SystemExit("conv_batch_scaling.py: the cpp backend is not built")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64 * 9, generator=generator)
    matrix = fk.SparseMatrix.from_dense(weight, torch.rand(weight.shape, generator=generator) < args.density)
    print(f"torch {torch.__version__}, {args.threads} thread(s), d = {args.density}")
    print("| batch | forward ms / sample | input grad ms / sample | weight grad ms / sample |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in (int(b) for b in args.batches.split(",")):
        forward, input_grad, weight_grad = per_sample_ms(batch, matrix, generator)
        print(f"| {batch} | {forward:.3f} | {input_grad:.3f} | {weight_grad:.3f} |", flush=True)


if __name__ == "__main__":
    main()
