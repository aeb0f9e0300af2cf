"""ms per call of each C++ sparse-convolution kernel alone (forward, input gradient, weight gradient) on ResNet-18's
stage-1 layer (64 -> 64 channels, 32x32, 3x3, padding 1), its 1x1 stride-2 downsample (64 -> 128) and, with
``--shapes``, its stage-2 (64 -> 128, 3x3 stride 2) and stage-3 (256 -> 256, 8x8) layers, activations
already in the kernels' contiguous (C, H, W, N) layout, fixed random patterns; median of 11 calls after one warm-up,
with ``fedspa.device.keep_freed_memory`` (as ``fedspa train``), 1 thread by default.

To compare two builds, run it from a directory outside both checkouts with each one's package first on the path,
alternating:

    cd /tmp && PYTHONPATH=<before checkout> python <this file> --batch 32
    cd /tmp && PYTHONPATH=<after checkout> python <this file> --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fedspa.device
import fedspa_kernels as fk
from fedspa_kernels.ops import sparse_conv2d as sc

# (name, in channels, out channels, input size, kernel, stride, padding)
SHAPES = {"stage1": (64, 64, 32, 3, 1, 1), "downsample": (64, 128, 32, 1, 2, 0), "stage2": (64, 128, 32, 3, 2, 1),
          "stage3": (256, 256, 8, 3, 1, 1)}


def median_ms(call) -> float:
    call()
    times = []
    for _ in range(11):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="stage1,downsample", help=f"of {', '.join(SHAPES)}")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if unknown := [name for name in shapes if name not in SHAPES]:
        parser.error(f"unknown shapes {unknown}: known {list(SHAPES)}")
    if not fk.available_backends()["cpp"]:
        raise SystemExit("conv_kernel_times.py: the cpp backend is not built")
    torch.set_num_threads(args.threads)
    fedspa.device.keep_freed_memory()
    print(f"{fk.__file__}: torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    print("| layer | d | forward ms | input grad ms | weight grad ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in shapes:
        cin, cout, size, k, stride, pad = SHAPES[name]
        generator = torch.Generator().manual_seed(0)
        out_size = (size + 2 * pad - k) // stride + 1
        geometry = ([k, k], [stride, stride], [pad, pad], [1, 1])
        x = torch.randn(cin, size, size, args.batch, generator=generator)
        dy = torch.randn(cout, out_size, out_size, args.batch, generator=generator)
        for density in (float(d) for d in args.densities.split(",")):
            weight = torch.randn(cout, cin * k * k, generator=generator)
            m = fk.SparseMatrix.from_dense(weight, torch.rand(weight.shape, generator=generator) < density)
            forward = median_ms(lambda: sc.SPARSE_CONV2D.kernel("cpp")(m.values, m.crow_indices, m.col_indices, x,
                                                                        *geometry))
            input_grad = median_ms(lambda: sc.SPARSE_CONV2D_INPUT_GRAD.kernel("cpp")(
                m.values, m.crow_indices, m.col_indices, dy, [cin, size, size], *geometry))
            weight_grad = median_ms(lambda: sc.SPARSE_CONV2D_WEIGHT_GRAD.kernel("cpp")(
                dy, x, m.crow_indices, m.col_indices, *geometry))
            print(f"| {name} | {density} | {forward:.2f} | {input_grad:.2f} | {weight_grad:.2f} |")


if __name__ == "__main__":
    main()
