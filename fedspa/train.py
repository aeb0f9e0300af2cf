"""``fedspa.train.run(config)``: one federated experiment, logged, checkpointed and resumable.

The output folder holds ``config.yaml``, ``partition.json`` (which samples each client has),
``label_distribution.png``, ``metrics.jsonl`` / ``metrics.csv`` (one row per round), ``summary.json``,
``accuracy_vs_round.png``, ``accuracy_vs_bytes.png`` and ``checkpoint.pt`` (every client's state). A run killed
mid-way resumes from its last checkpoint (``resume=True``) and ends exactly as an uninterrupted run: every random
draw comes from (seed, client, round)-seeded generators, and the checkpoint holds the whole algorithm state.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import pickle
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .algorithms import algorithm_class
from .config import ExperimentConfig
from .data import federated_data, plot_label_distribution
from .models import build_model

CHECKPOINT_FORMAT = "fedspa-checkpoint"
CHECKPOINT_VERSION = 1
# fields that do not change what a run computes: a checkpoint may be resumed with other values
_NON_SEMANTIC = {"name", "output_dir", "progress", "threads", "checkpoint_every", "measure_memory"}


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict]
    summary: dict


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, not fedspa's, or written by a different experiment."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_checkpoint(path: Path, config: ExperimentConfig) -> dict:
    """The checkpoint at `path`, checked to belong to this experiment.

    Raises:
        CheckpointError: unreadable, not a fedspa checkpoint, another version, or another experiment's.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fedspa checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, this fedspa reads "
                              f"{CHECKPOINT_VERSION}")
    saved, current = _flatten(state["config"]), _flatten(config.to_dict())
    defaults = _flatten(ExperimentConfig().to_dict())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}  # fields added since: defaults
    differing = sorted(k for k in set(saved) | set(current)
                       if k.split(".")[0] not in _NON_SEMANTIC and saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in differing)
        raise CheckpointError(f"checkpoint {path} was written by a different experiment ({details})")
    return state


def _save_checkpoint(path: Path, config: ExperimentConfig, round_index: int, algorithm_state: dict,
                     history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.to_dict(),
                "round": round_index, "algorithm": algorithm_state, "history": history}, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint


def summarize(history: list[dict], config: ExperimentConfig) -> dict:
    """Final and best personalized accuracy, totals of bytes/FLOPs/time, peak client memory."""
    evaluated = [h for h in history if "acc_pooled" in h]
    last = evaluated[-1] if evaluated else {}
    best = max(evaluated, key=lambda h: h["acc_pooled"]) if evaluated else {}
    peaks = [h["peak_memory"] for h in history if h.get("peak_memory")]
    return {
        "algorithm": config.algorithm,
        "execution": config.fedspa.execution if config.algorithm in ("fedspa", "sub_fedavg") else "dense",
        "density": config.fedspa.density if config.algorithm in ("fedspa", "sub_fedavg") else 1.0,
        "rounds": len(history),
        "final_round": last.get("round"),
        "final_acc_pooled": last.get("acc_pooled"),
        "final_acc_mean": last.get("acc_mean"),
        "final_acc_std": last.get("acc_std"),
        "best_round": best.get("round"),
        "best_acc_pooled": best.get("acc_pooled"),
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        "training_flops": sum(h["flops"] for h in history),
        "peak_client_memory": max(peaks) if peaks else None,
        "train_seconds": sum(h["train_seconds"] for h in history),
        "seconds_per_round": sum(h["train_seconds"] for h in history) / max(len(history), 1),
        "median_seconds_per_round": statistics.median(h["train_seconds"] for h in history) if history else None,
    }


def _plot(history: list[dict], out: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [h for h in history if "acc_pooled" in h]
    if not evaluated:
        return
    rounds = [h["round"] for h in evaluated]
    mean = [h["acc_mean"] for h in evaluated]
    std = [h["acc_std"] for h in evaluated]
    cumulative, running = {}, 0
    for h in history:
        running += h["bytes_up"] + h["bytes_down"]
        cumulative[h["round"]] = running
    for name, xs, xlabel in (("accuracy_vs_round", rounds, "round"),
                             ("accuracy_vs_bytes", [cumulative[r] / 1e6 for r in rounds], "MB communicated (up + down)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [h["acc_pooled"] for h in evaluated], label=f"{label} (pooled)")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                        label=f"{label} (mean ± std over clients)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("personalized test accuracy")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def run(config: ExperimentConfig, *, output_dir: str | Path | None = None, resume: bool = False,
        stop_after: int | None = None) -> RunResult:
    """Runs (or resumes) one experiment.

    Args:
        config: the experiment (validated here).
        output_dir: where to write; default ``<config.output_dir>/<UTC time>_<config.name>``.
        resume: continue from ``output_dir/checkpoint.pt`` if it exists.
        stop_after: stop after this many rounds in total (as if killed there), checkpoint included.

    Returns:
        The per-round history, the summary, and the output folder.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(output_dir) if output_dir is not None else Path(config.output_dir) / f"{stamp}_{config.name}"
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"

    clients, num_classes, input_shape, record = federated_data(config.data, config.clients)
    algorithm = algorithm_class(config.algorithm)(config, clients, lambda: build_model(config.model, input_shape,
                                                                                        num_classes),
                                                  input_shape, num_classes)
    history: list[dict] = []
    start = 0
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, config)
        algorithm.load_state_dict(state["algorithm"])
        history = list(state["history"])
        start = int(state["round"])
    else:
        config.save(out / "config.yaml")
        (out / "partition.json").write_text(json.dumps(record))
        plot_label_distribution(clients, num_classes, out / "label_distribution.png")

    show = config.progress if config.progress is not None else sys.stderr.isatty()
    last = config.rounds if stop_after is None else min(config.rounds, stop_after)
    bar = tqdm(range(start, last), desc=config.name, disable=not show, initial=start, total=config.rounds)
    with (out / "metrics.jsonl").open("w") as log:
        for h in history:
            log.write(json.dumps(h) + "\n")
        for t in bar:
            began = time.perf_counter()
            algorithm.measurement_seconds = 0.0
            results = algorithm.run_round(t)
            seconds = time.perf_counter() - began - algorithm.measurement_seconds
            samples = sum(r.samples for r in results)
            peaks = [r.peak_memory for r in results if r.peak_memory is not None]
            row = {
                "round": t + 1,
                "lr": algorithm.learning_rate(t),
                "sampled": [r.client for r in results],
                "train_loss": sum(r.train_loss * r.samples for r in results) / max(samples, 1),
                "bytes_up": sum(r.bytes_up for r in results),
                "bytes_down": sum(r.bytes_down for r in results),
                "flops": sum(r.flops for r in results),
                "flops_per_client": sum(r.flops for r in results) / max(len(results), 1),
                "peak_memory": max(peaks) if peaks else None,
                "train_seconds": seconds,
            }
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                began = time.perf_counter()
                row.update(algorithm.evaluate_all())
                row["eval_seconds"] = time.perf_counter() - began
                bar.set_postfix(acc=f"{row['acc_pooled']:.3f}", loss=f"{row['train_loss']:.3f}")
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if (t + 1) % config.checkpoint_every == 0 or t + 1 == last:
                _save_checkpoint(checkpoint, config, t + 1, algorithm.state_dict(), history)
    bar.close()

    columns: list[str] = []
    for h in history:  # the union, in first-seen order (rounds without evaluation lack the accuracies)
        columns += [k for k in h if k not in columns and k not in ("sampled", "acc_per_client")]
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for h in history:
            writer.writerow({k: h.get(k, "") for k in columns})
    summary = summarize(history, config)
    summary["output_dir"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(history, out, config.name)
    return RunResult(out, history, summary)


def format_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"
