"""How stable the measured layer choice is: time one Conv2d case with :func:`fedspa.execution.time_layer` several
times, each as a fresh cache would (a new process per run, as a new machine or cache folder does), and print each
run's ratio (sparse / dense x mask) and choice. A layer whose choice flips between runs gets a different plan in
two experiments of the same code. For A/B comparisons of two checkouts run it from outside both with PYTHONPATH set to
each, alternating:

    cd /tmp && PYTHONPATH=<checkout> python <main>/benchmarks/layer_choice.py --runs 1 \
        --conv 128,128,16,1 --batch 128 --density 0.25 --threads 2

Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn


def _one(args: argparse.Namespace) -> dict:
    from fedspa.execution import time_layer

    torch.set_num_threads(args.threads)
    c_in, c_out, size, stride = (int(v) for v in args.conv.split(","))
    generator = torch.Generator().manual_seed(0)
    module = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    mask = torch.rand(module.weight.shape, generator=generator) < args.density
    began = time.perf_counter()
    timing = time_layer(module, mask, (args.batch, c_in, size, size), input_grad=True)
    return {"conv": args.conv, "batch": args.batch, "density": args.density, "threads": args.threads,
            "sparse_ms": round(timing.sparse_ms, 2), "masked_ms": round(timing.masked_ms, 2),
            "ratio": round(timing.sparse_ms / timing.masked_ms, 3), "choice": timing.choice,
            "seconds_to_decide": round(time.perf_counter() - began, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conv", default="128,128,16,1", help="in channels, out channels, input size, stride (3x3)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)  # one run in this process
    args = parser.parse_args()
    if args.inline:
        print(json.dumps(_one(args)), flush=True)
        return
    forwarded = [a for a in sys.argv[1:] if a != "--inline"]
    for _ in range(args.runs):
        result = subprocess.run([sys.executable, __file__, *forwarded, "--inline"], capture_output=True, text=True,
                                check=True)
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
