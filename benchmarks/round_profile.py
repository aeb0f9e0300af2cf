"""Where a federated round's time goes: the default experiment (or any config) run through ``fedspa.train.run``
with timers around each part of the real code path, FedSpa next to its dense-masked twin.

Parts (seconds summed over the timed rounds; shares of the round's wall time):

- ``downlink``: the server's training and evaluation payloads (``downlink``, which ``evaluation_downlink`` calls)
- ``build``: a client decoding a payload (``_decode``) and building a dense model from it (``_dense_model``)
- ``plan``: choosing and building each layer's execution (sparse layers, masks; ``_execute``), or refilling the
  prepared model a client keeps (``set_masked_weights``: new values, and new patterns where its mask moved)
- ``train``: the local SGD steps (``local_train``), split by torch.profiler into the op groups below
- ``mask_update``: |gradient| scores (``gradient_scores``) and prune/regrow (``update_masks``)
- ``upload``: encoding the payload; ``receive`` / ``aggregate``: the server's checks and aggregation
- ``eval_forward``: every client's personal model on its test split (``evaluate_model``)
- ``checkpoint``: writing the run's checkpoint; ``other``: the rest of the round (the client's and server's glue
  around the parts: dense copies of the trained weights, masks, metrics)

A round is ``Federation.round`` (training and aggregation) + ``Federation.evaluate`` (every client's personal model)
+ the checkpoint: what ``fedspa train`` does per round, without loading data and writing plots.

Before the timed runs, each variant runs once untimed (a process's first run was up to 1.4x slower than the
next ones). In each run, the first round is a warm-up (it measures the layer timings of the fastest policy, in a fresh
cache folder, and builds each sampled client's model) and is left out. One run per variant, interleaved ``--runs``
times; the table gives the median over runs of each part.
A second pass runs one round under torch.profiler and groups the training step's time by op (sparse kernels,
dense conv/linear, pooling, layout copies, optimizer, ...).

    python benchmarks/round_profile.py benchmarks/results/round_profile_<date>.json [--rounds 4] [--runs 3]
        [--variants fedspa,fedspa:dense_masked] [overrides ...]
    python benchmarks/round_profile.py --report benchmarks/results/round_profile_<date>.json   (the table again)

With ``--random-images C,H,W`` every client gets ``--samples`` random images of that shape (and random labels) instead
of the config's dataset: e.g. ResNet-18 on CIFAR-shaped inputs without the CIFAR files (``model.name=resnet18
local_steps=2``); the data do not change the time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
PARTS = ("downlink", "build", "plan", "train", "mask_update", "upload", "receive", "aggregate", "eval_forward",
         "checkpoint", "other")


def _timed(totals: dict, part: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - began
    return wrapper


@contextlib.contextmanager
def instrumented(totals: dict, warm_up_rounds: int = 0):
    """Wraps the parts' functions (class attributes, so every instance is timed) for the duration; the totals start
    after the first `warm_up_rounds` checkpoints (one per round)."""
    from fedspa import train
    from fedspa.algorithms import base, fedspa as fedspa_alg

    targets = [
        (train.Federation, "round", "round"),
        (train.Federation, "evaluate", "round"),
        (fedspa_alg.FedSpaServer, "downlink", "downlink"),
        (fedspa_alg.FedSpaClient, "_decode", "build"),
        (fedspa_alg.FedSpaClient, "_dense_model", "build"),
        (fedspa_alg.FedSpaClient, "_execute", "plan"),
        (fedspa_alg, "set_masked_weights", "plan"),
        (base.Client, "local_train", "train"),
        (fedspa_alg.FedSpaClient, "update_masks", "mask_update"),
        (fedspa_alg.FedSpaClient, "upload", "upload"),
        (fedspa_alg.FedSpaServer, "receive", "receive"),
        (fedspa_alg.FedSpaServer, "aggregate", "aggregate"),
        (base.Client, "evaluate_model", "eval_forward"),
    ]
    if "_decode" not in fedspa_alg.FedSpaClient.__dict__:  # an older tree (an A/B): its received_model built the model
        targets.append((fedspa_alg.FedSpaClient, "received_model", "build"))
    saved = []
    for owner, name, part in targets:
        if name not in owner.__dict__:  # an older tree without that function
            continue
        original = owner.__dict__[name]
        saved.append((owner, name, original))
        setattr(owner, name, _timed(totals, part, original))
    checkpoint = train.__dict__["_save_checkpoint"]
    timed_checkpoint = _timed(totals, "checkpoint", checkpoint)
    rounds_done = [0]

    def save_and_count(*args, **kwargs):
        result = timed_checkpoint(*args, **kwargs)
        rounds_done[0] += 1
        if rounds_done[0] <= warm_up_rounds:
            totals.clear()
        return result

    train._save_checkpoint = save_and_count
    try:
        yield
    finally:
        train._save_checkpoint = checkpoint
        for owner, name, original in saved:
            setattr(owner, name, original)


def _config(variant: str, overrides: list[str], rounds: int):
    from fedspa.config import ExperimentConfig

    algorithm, _, execution = variant.partition(":")
    extra = [f"fedspa.execution={execution}"] if execution else []
    return ExperimentConfig.load(DEFAULT_CONFIG, [*overrides, f"algorithm={algorithm}", *extra,
                                                         f"rounds={rounds}", "progress=false",
                                                         "measure_memory=false"])


def random_images(shape: tuple[int, ...], samples: int, clients: int):
    """Random images and labels for every client (training and a quarter as many for testing)."""
    from fedspa.data import FederatedData

    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for _ in range(clients):
        train.append((torch.rand(samples, *shape, generator=g), torch.randint(0, 10, (samples,), generator=g)))
        test.append((torch.rand(max(1, samples // 4), *shape, generator=g),
                     torch.randint(0, 10, (max(1, samples // 4),), generator=g)))
    return FederatedData.from_tensors(train=train, test=test, num_classes=10)


def profile_run(variant: str, overrides: list[str], rounds: int, images: tuple[int, ...] | None = None,
                samples: int = 64) -> dict:
    """Runs `rounds` + 1 rounds (the first a warm-up); the parts' seconds over the timed rounds."""
    from fedspa.train import run

    totals: dict[str, float] = collections.defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp, instrumented(totals, warm_up_rounds=1):
        config = _config(variant, overrides, rounds + 1)
        data = random_images(images, samples, config.clients) if images else None
        result = run(config, output_dir=Path(tmp) / "run", data=data)
    wall = totals["round"] + totals["checkpoint"]  # the rounds themselves (not loading data, not writing plots)
    parts = {p: totals.get(p, 0.0) for p in PARTS if p != "other"}
    # none of the parts' functions call one another: the rest of the rounds' time is glue
    parts["other"] = max(0.0, wall - sum(parts.values()))
    history = result.history[1:]  # the warm-up round left out
    return {"variant": variant, "rounds": rounds, "wall_s": wall, "per_round_s": wall / rounds,
            "train_seconds_median": statistics.median(h["train_seconds"] for h in history),
            "eval_seconds_median": statistics.median(h["eval_seconds"] for h in history if "eval_seconds" in h),
            "parts_s": parts, "acc_final": history[-1].get("acc_pooled")}


def _group(name: str) -> str:
    n = name.lower()
    if n.startswith("fedspa::transpose_copy"):  # a layout change, not a sparse product
        return "copies / layout"
    if n.startswith("fedspa::"):
        return "fedspa sparse kernels"
    for key, group in (("group_norm", "normalization layers"), ("batch_norm", "normalization layers"),
                       ("layer_norm", "normalization layers"), ("conv", "dense conv (+ backward)"), ("mkldnn", "dense conv (+ backward)"),
                       ("addmm", "dense linear (matmul)"), ("mm", "dense linear (matmul)"),
                       ("pool", "max_pool2d (+ backward)"), ("copy_", "copies / layout"), ("clone", "copies / layout"),
                       ("contiguous", "copies / layout"), ("permute", "copies / layout"), ("relu", "relu / threshold"),
                       ("threshold", "relu / threshold"), ("sgd", "optimizer"), ("_foreach", "optimizer"),
                       ("norm", "grad clip / norms"), ("cross_entropy", "loss"), ("nll", "loss"),
                       ("log_softmax", "loss"), ("mul", "elementwise (mask, scale)"), ("add", "elementwise (mask, scale)")):
        if key in n:
            return group
    return "other ops"


def op_profile(variant: str, overrides: list[str], images: tuple[int, ...] | None = None,
               samples: int = 64) -> dict[str, float]:
    """Self CPU time (s) by op group over one round's training steps (after a warm-up round), torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from fedspa.algorithms import base
    from fedspa.train import run

    events: dict[str, float] = collections.defaultdict(float)
    original = base.Client.local_train

    def local_train(self, model, round_index, *args, **kwargs):
        if round_index < 1:  # the warm-up round
            return original(self, model, round_index, *args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = original(self, model, round_index, *args, **kwargs)
        for e in prof.key_averages():
            events[_group(e.key)] += e.self_cpu_time_total / 1e6
        return result

    with tempfile.TemporaryDirectory() as tmp:
        base.Client.local_train = local_train
        try:
            config = _config(variant, overrides, 2)
            data = random_images(images, samples, config.clients) if images else None
            run(config, output_dir=Path(tmp) / "run", data=data)
        finally:
            base.Client.local_train = original
    return dict(sorted(events.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the JSON to write (or, with --report, to read)")
    parser.add_argument("--report", action="store_true", help="print the table of an existing JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.name=resnet18")
    parser.add_argument("--variants", default="fedspa,fedspa:dense_masked")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--random-images", help="C,H,W: random images of this shape instead of the dataset")
    parser.add_argument("--samples", type=int, default=64, help="training samples per client with --random-images")
    args = parser.parse_args()
    if args.report:
        blob = json.loads(Path(args.output).read_text())
        print(report(blob["runs"], blob["train_ops_s"]))
        return
    os.environ["FEDSPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedspa-bench-cache-")  # layer timings measured afresh
    variants = args.variants.split(",")
    images = tuple(int(v) for v in args.random_images.split(",")) if args.random_images else None
    runs = {v: [] for v in variants}
    for v in variants:  # a process's first run is slower (measured up to 1.4x the next ones): not timed
        profile_run(v, args.overrides, 1, images, args.samples)
    for r in range(args.runs):
        for v in variants if r % 2 == 0 else list(reversed(variants)):
            row = profile_run(v, args.overrides, args.rounds, images, args.samples)
            runs[v].append(row)
            print(json.dumps(row), flush=True)
    ops = {v: op_profile(v, args.overrides, images, args.samples) for v in variants}
    import fedspa_kernels as fk

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "fedspa_kernels": getattr(fk, "__version__", "?"), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor(), "overrides": args.overrides,
            "random_images": args.random_images, "samples": args.samples if args.random_images else None,
            "rounds": args.rounds, "method": __doc__.strip()}
    Path(args.output).write_text(json.dumps({"meta": meta, "runs": runs, "train_ops_s": ops}, indent=1))
    print(report(runs, ops))


def report(runs: dict[str, list[dict]], ops: dict[str, dict[str, float]]) -> str:
    """A markdown table: per part, the median seconds per round and its share, per variant."""
    variants = list(runs)
    lines = ["| part | " + " | ".join(f"{v} s / round | share" for v in variants) + " |",
             "| --- | " + " | ".join("---: | ---:" for _ in variants) + " |"]
    per_round = {v: statistics.median(r["per_round_s"] for r in runs[v]) for v in variants}
    for part in PARTS:
        cells = []
        for v in variants:
            s = statistics.median(r["parts_s"][part] / r["rounds"] for r in runs[v])
            cells.append(f"{s:.3f} | {100 * s / per_round[v]:.0f}%")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **whole round** | " + " | ".join(f"**{per_round[v]:.3f}** | 100%" for v in variants) + " |")
    for v in variants:
        rng = [r["per_round_s"] for r in runs[v]]
        lines.append(f"\n{v}: {min(rng):.3f}-{max(rng):.3f} s / round over {len(rng)} runs; training steps by op "
                     "group (one round, torch.profiler self time): " + ", ".join(
                         f"{k} {s:.3f} s" for k, s in ops[v].items()))
    if len(variants) == 2:
        a, b = variants
        ratios = [rb["per_round_s"] / ra["per_round_s"] for ra, rb in zip(runs[a], runs[b])]
        lines.append(f"\n{b} / {a}, whole round (training + evaluation): {min(ratios):.2f}-{max(ratios):.2f}x "
                     f"(median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
