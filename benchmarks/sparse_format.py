"""What the sparse format costs: a sparse layer's training memory against the dense layer's, and its training-step
time, measured the same way on two builds of fedspa (an A/B of a format change: run ``measure`` once per build, in
alternation, then ``report``).

Memory: ``fedspa.nn.training_memory_bytes`` after one SGD step (parameters, gradients, optimizer state and the
pattern buffers) of SparseLinear / SparseConv2d against nn.Linear / nn.Conv2d, with momentum 0.9 and without.
Time: one training step of the layer (forward, input gradient, weight gradient: ``step``) and forward + input
gradient alone (``input_grad``: the values do not require grad), median of ``--repeats`` after 3 warm-ups, at the
peer benchmark's shapes, on ``--threads`` threads.

    python benchmarks/sparse_format.py measure out_<label>_run<i>.json --label new [--threads 1]
    python benchmarks/sparse_format.py report --old old_run*.json --new new_run*.json --markdown table.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

LINEAR = [  # (out, in, batch, density)
    (512, 3136, 32, 0.1), (512, 3136, 64, 0.1), (3072, 768, 256, 0.1), (1024, 1024, 256, 0.1), (1024, 1024, 256, 0.5),
    (512, 3136, 32, 0.5)]
CONV = [  # (in, out, hw, kernel, stride, batch, density)
    (32, 64, 14, 5, 1, 32, 0.1), (64, 64, 32, 3, 1, 32, 0.1), (64, 64, 32, 3, 1, 32, 0.5), (256, 256, 8, 3, 1, 32, 0.5),
    (512, 512, 4, 3, 1, 32, 0.1), (512, 512, 4, 3, 1, 32, 0.5), (256, 512, 8, 1, 2, 32, 0.5)]
MEMORY = [("linear 1024->512", lambda: nn.Linear(1024, 512)), ("conv 128-128 k3", lambda: nn.Conv2d(128, 128, 3)),
          ("conv 512-512 k3 (ResNet-18 stage 4)", lambda: nn.Conv2d(512, 512, 3))]
SMALL = {  # --small: every path on tiny shapes (the test suite's smoke run)
    "LINEAR": [(16, 24, 8, 0.3)], "CONV": [(3, 4, 6, 3, 1, 4, 0.3)],
    "MEMORY": [("linear 24->16", lambda: nn.Linear(24, 16)), ("conv 4-4 k3", lambda: nn.Conv2d(4, 4, 3))]}


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def memory_rows() -> list[dict]:
    from fedspa.nn import SparseConv2d, SparseLinear, training_memory_bytes

    rows = []
    for label, make in MEMORY:
        for density in (0.5, 0.2, 0.1):
            for momentum in (0.9, 0.0):
                torch.manual_seed(0)
                dense = make()
                mask = torch.rand(dense.weight.shape) < density
                kind = SparseLinear if isinstance(dense, nn.Linear) else SparseConv2d
                sparse = kind.from_dense(dense, mask)
                x = torch.randn(2, dense.in_features) if isinstance(dense, nn.Linear) else \
                    torch.randn(2, dense.in_channels, 5, 5)
                usage = {}
                for name, model in (("dense", dense), ("sparse", sparse)):
                    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
                    model(x).sum().backward()
                    opt.step()
                    usage[name] = training_memory_bytes(model, opt)
                rows.append({"layer": label, "density": density, "momentum": momentum, "nnz": int(mask.sum()),
                             "dense_bytes": usage["dense"]["total"], "sparse_bytes": usage["sparse"]["total"],
                             "index_bytes": usage["sparse"]["buffers"],
                             "ratio": usage["sparse"]["total"] / usage["dense"]["total"]})
    return rows


def time_rows(repeats: int) -> list[dict]:
    import fedspa_kernels as fk

    g = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f, batch, density in LINEAR:
        S = fk.SparseMatrix.from_dense(torch.randn(out_f, in_f, generator=g),
                                       torch.rand(out_f, in_f, generator=g) < density)
        W = S.with_values(S.values.detach().clone().requires_grad_())
        x = torch.randn(batch, in_f, generator=g, requires_grad=True)
        dy = torch.randn(batch, out_f, generator=g)
        rows.append({"layer": f"linear {in_f}->{out_f}, batch {batch}", "density": density,
                     "step_ms": _median_ms(lambda: fk.sparse_linear(x, W).backward(dy), repeats),
                     "input_grad_ms": _median_ms(lambda: fk.sparse_linear(x, S).backward(dy), repeats)})
    for c, o, hw, k, s, batch, density in CONV:
        S = fk.SparseMatrix.from_dense(torch.randn(o, c * k * k, generator=g),
                                       torch.rand(o, c * k * k, generator=g) < density)
        W = S.with_values(S.values.detach().clone().requires_grad_())
        x = torch.randn(batch, c, hw, hw, generator=g, requires_grad=True)
        dy = torch.randn_like(fk.sparse_conv2d(x, S, k, padding=k // 2, stride=s))
        reps = max(3, repeats // 3)
        rows.append({"layer": f"conv {c}-{o} {hw}x{hw} k{k} s{s}, batch {batch}", "density": density,
                     "step_ms": _median_ms(lambda: fk.sparse_conv2d(x, W, k, padding=k // 2, stride=s).backward(dy),
                                           reps),
                     "input_grad_ms": _median_ms(
                         lambda: fk.sparse_conv2d(x, S, k, padding=k // 2, stride=s).backward(dy), reps)})
    return rows


def measure(args) -> None:
    import fedspa_kernels as fk

    if args.small:
        globals().update(SMALL)
    torch.set_num_threads(args.threads)
    root = Path(fk.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    meta = {"label": args.label, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "tree": str(root), "torch": torch.__version__, "threads": args.threads,
            "platform": platform.platform(), "processor": platform.processor(), "repeats": args.repeats}
    result = {"meta": meta, "memory": memory_rows(), "time": time_rows(args.repeats)}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(meta))


def report(args) -> None:
    old = [json.loads(Path(f).read_text()) for f in args.old]
    new = [json.loads(Path(f).read_text()) for f in args.new]
    lines = [f"Builds: {old[0]['meta']['label']} ({old[0]['meta']['commit']}) vs {new[0]['meta']['label']} "
             f"({new[0]['meta']['commit']}), {new[0]['meta']['threads']} thread(s), torch {new[0]['meta']['torch']}, "
             f"{new[0]['meta']['date'][:10]}; {len(old)} runs each, alternating.", "",
             "**Training memory** (weights + gradients + optimizer state + index metadata, after one SGD step) as "
             "a share of the dense layer's:", "",
             f"| layer | density | momentum | {old[0]['meta']['label']} | {new[0]['meta']['label']} | "
             f"index bytes per active weight ({new[0]['meta']['label']}) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for a, b in zip(old[0]["memory"], new[0]["memory"]):
        lines.append(f"| {b['layer']} | {b['density']} | {b['momentum']} | {a['ratio']:.3f}x | {b['ratio']:.3f}x | "
                     f"{b['index_bytes'] / max(1, b['nnz']):.2f} |")
    lines += ["", f"**Time** (ms, median per run; ratio = {old[0]['meta']['label']} / {new[0]['meta']['label']}, "
              "range over runs, > 1: the new build is faster):", "",
              f"| layer | density | step {old[0]['meta']['label']} | step {new[0]['meta']['label']} | step ratio | "
              "fwd + input grad ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(new[0]["time"]):
        step_old = [run["time"][i]["step_ms"] for run in old]
        step_new = [run["time"][i]["step_ms"] for run in new]
        ratios = [a / b for a, b in zip(step_old, step_new)]
        ig = [a["time"][i]["input_grad_ms"] / b["time"][i]["input_grad_ms"] for a, b in zip(old, new)]
        lines.append(f"| {row['layer']} | {row['density']} | {statistics.median(step_old):.2f} | "
                     f"{statistics.median(step_new):.2f} | {min(ratios):.2f}–{max(ratios):.2f}x | "
                     f"{min(ig):.2f}–{max(ig):.2f}x |")
    text = "\n".join(lines)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("output")
    m.add_argument("--label", required=True)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--repeats", type=int, default=21)
    m.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    r = sub.add_parser("report")
    r.add_argument("--old", nargs="+", required=True, help="the first build's files")
    r.add_argument("--new", nargs="+", required=True, help="the second build's files")
    r.add_argument("--markdown")
    args = parser.parse_args(sys.argv[1:])
    measure(args) if args.command == "measure" else report(args)


if __name__ == "__main__":
    main()
