"""Several algorithms on the same partition and seeds: one table (markdown + CSV + JSON) and plots.

A variant is ``algorithm`` or ``algorithm:execution`` (``fedspa:dense_masked``: FedSpa's masks and updates on dense
weights times the mask; any registered algorithm with execution modes has them), optionally followed by
``+key=value`` overrides of the shared config for that variant alone (``fedspa+fedspa.regrowth=gradient``: an
ablation). Every run lands in ``<output>/<variant>_seed<k>/`` (a full ``fedspa.train`` folder); a comparison that was
interrupted resumes its unfinished runs from their checkpoints.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .algorithms import registry
from .config import ExperimentConfig, parse_override
from .plots import plot_comparison
from .train import RunResult, run

DEFAULT_VARIANTS = ("fedspa", "fedspa:dense_masked", "fedavg")


def all_variants() -> list[str]:
    """Every registered algorithm, each followed by its non-default execution modes (``fedspa:dense_masked``)."""
    out = []
    for name, spec in registry.registered().items():
        out += [name] + [f"{name}:{e}" for e in spec.executions[1:]]
    return out


def expand_variants(specs: list[str] | tuple[str, ...]) -> list[str]:
    """The variant strings, with ``all`` standing for every algorithm and its execution modes."""
    out: list[str] = []
    for spec in specs:
        for v in (all_variants() if spec.strip() == "all" else [spec]):
            if v not in out:
                out.append(v)
    return out


# what a variant's overrides may not set: the variant itself says them (or compare does, per seed)
_NOT_OVERRIDDEN = ("algorithm", "seed", "name", "output_dir", "fedspa.execution")


@dataclass
class Variant:
    """One column of the comparison: an algorithm, for FedSpa how it executes, and its own config overrides."""

    algorithm: str
    execution: str = "sparse"
    overrides: tuple[str, ...] = ()  # "key=value", applied to the shared config for this variant alone

    @property
    def label(self) -> str:
        base = self.algorithm if self.execution == "sparse" else f"{self.algorithm}:{self.execution}"
        return "+".join((base, *self.overrides))

    @property
    def folder_prefix(self) -> str:
        """The label as a run name: characters a folder name may not hold become '-'."""
        return re.sub(r"[^A-Za-z0-9._+-]", "-", self.label.replace(":", "_"))

    @classmethod
    def parse(cls, spec: str) -> Variant:
        head, *overrides = spec.strip().split("+")
        overrides = tuple(o.strip() for o in overrides)
        for item in overrides:
            key, value = parse_override(item)  # ValueError for anything that is not key=value
            if key in _NOT_OVERRIDDEN:
                raise ValueError(f"variant {spec!r}: {key} is not a per-variant override (write the variant as "
                                 "algorithm[:execution]; seeds and the output folder belong to the comparison)")
        algorithm, _, execution = head.strip().partition(":")
        if algorithm not in registry.names():
            raise ValueError(f"unknown algorithm {algorithm!r} in variant {spec!r}; choose from "
                             f"{', '.join(registry.names())}")
        executions = registry.get(algorithm).executions
        if execution and not executions:
            raise ValueError(f"variant {spec!r}: {algorithm} has no execution mode")
        execution = execution or (executions[0] if executions else "sparse")
        if executions and execution not in executions:
            raise ValueError(f"unknown execution {execution!r} in variant {spec!r}; choose from {', '.join(executions)}")
        return cls(algorithm, execution, overrides)

    def configure(self, base: ExperimentConfig, seed: int) -> ExperimentConfig:
        """The config of this variant's run with `seed` (ValueError naming the variant for a bad override)."""
        try:
            config = base.overridden(list(self.overrides)) if self.overrides else copy.deepcopy(base)
        except ValueError as exc:
            raise ValueError(f"variant {self.label!r}: {exc}") from None
        config.algorithm = self.algorithm
        if registry.get(self.algorithm).executions:
            config.fedspa.execution = self.execution
        config.seed = seed
        config.name = f"{self.folder_prefix}_seed{seed}"
        if len(config.name) > 100:
            raise ValueError(f"variant {self.label!r} is too long to name its run folders ({len(config.name)} > 100 "
                             "characters with the seed): put the overrides every variant shares in the config")
        return config.validate()


@dataclass
class Comparison:
    output_dir: Path
    rows: list[dict]  # one per variant, aggregated over seeds
    runs: dict[str, list[RunResult]]  # variant label -> one result per seed
    target_accuracy: float
    markdown: str


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std())


def bytes_to_accuracy(history: list[dict], target: float) -> float | None:
    """Bytes (up + down) communicated until the pooled accuracy first reached `target`; None if it never did."""
    reached = _reach(history, target)
    return reached[1] if reached else None


def rounds_to_accuracy(history: list[dict], target: float) -> int | None:
    """The first round whose pooled accuracy reached `target`; None if none did."""
    reached = _reach(history, target)
    return reached[0] if reached else None


def _reach(history: list[dict], target: float) -> tuple[int, float] | None:
    total = 0
    for h in history:
        total += h["bytes_up"] + h["bytes_down"]
        if h.get("acc_pooled") is not None and h["acc_pooled"] >= target:
            return h["round"], float(total)
    return None


def default_target(final_accuracies: list[float]) -> float:
    """0.9 x the median of the variants' final accuracies, rounded down to a whole percent: a level most methods
    reach, so 'rounds / MB to reach' compares how fast they get there."""
    finite = [a for a in final_accuracies if a is not None and not math.isnan(a)]
    if not finite:
        return float("nan")
    return math.floor(90 * float(np.median(finite))) / 100


def _row(label: str, results: list[RunResult], target: float) -> dict:
    summaries = [r.summary for r in results]
    final = [s["final_acc_pooled"] for s in summaries]
    best = [s["best_acc_pooled"] for s in summaries]
    client_std = [s["final_acc_std"] for s in summaries]
    client_mean = [s["final_acc_mean"] for s in summaries]
    reach = [_reach(r.history, target) for r in results]  # (round, bytes) per seed, None if never reached
    reached = [b for _, b in filter(None, reach)]
    reach_rounds = [float(t) for t, _ in filter(None, reach)]
    rounds = [s["rounds"] for s in summaries]
    clients_trained = [sum(len(h["sampled"]) for h in r.history) for r in results]
    return {
        "variant": label,
        "seeds": len(results),
        "acc_final": _mean_std(final)[0],
        "acc_final_std_seeds": _mean_std(final)[1],
        "acc_client_mean": _mean_std(client_mean)[0],
        "acc_client_std": _mean_std(client_std)[0],
        "acc_best": _mean_std(best)[0],
        "bytes_total": _mean_std([s["bytes_up"] + s["bytes_down"] for s in summaries])[0],
        "bytes_up": _mean_std([s["bytes_up"] for s in summaries])[0],
        "bytes_down": _mean_std([s["bytes_down"] for s in summaries])[0],
        "bytes_to_target": _mean_std(reached)[0] if len(reached) == len(reach) else None,
        "rounds_to_target": _mean_std(reach_rounds)[0] if len(reached) == len(reach) else None,
        "seeds_reaching_target": len(reached),
        "training_flops": _mean_std([s["training_flops"] for s in summaries])[0],
        "flops_per_client_round": _mean_std([s["training_flops"] / max(c, 1)
                                              for s, c in zip(summaries, clients_trained)])[0],
        "peak_client_memory": _mean_std([s["peak_client_memory"] for s in summaries])[0],
        "seconds_per_round": _mean_std([s["median_seconds_per_round"] for s in summaries])[0],
        "rounds": int(np.median(rounds)),
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / scale:.{digits}f}"


def _reached(row: dict, key: str, scale: float) -> str:
    """The mean over seeds, or how many seeds reached the target when not all did."""
    if row[key] is not None:
        return _fmt(row[key], scale)
    return f"- ({row['seeds_reaching_target']}/{row['seeds']} seeds)"


def format_table(rows: list[dict], target: float, evaluated_on: str = "test") -> str:
    """The comparison as a markdown table (accuracies on the clients' `evaluated_on` split)."""
    level = f"{100 * target:.0f}%" if not math.isnan(target) else "-"
    split = "" if evaluated_on == "test" else f", on {evaluated_on}"
    head = (f"| variant | seeds | personalized acc. % (final, pooled{split}) | mean ± std over clients | best | "
            f"MB up+down | rounds to {level} | MB to {level} | training GFLOP / client-round | peak client MB | "
            "s / round (median) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {_fmt(r['acc_final'], 0.01)}"
            f"{' ± ' + _fmt(r['acc_final_std_seeds'], 0.01) if r['seeds'] > 1 else ''}"
            f" | {_fmt(r['acc_client_mean'], 0.01)} ± {_fmt(r['acc_client_std'], 0.01)} | {_fmt(r['acc_best'], 0.01)}"
            f" | {_fmt(r['bytes_total'], 1e6)} | {_reached(r, 'rounds_to_target', 1.0)}"
            f" | {_reached(r, 'bytes_to_target', 1e6)}"
            f" | {_fmt(r['flops_per_client_round'], 1e9, 2)} | {_fmt(r['peak_client_memory'], 1e6, 2)}"
            f" | {_fmt(r['seconds_per_round'], 1.0, 2)} |")
    return head + "\n".join(lines) + "\n"


def compare(config: ExperimentConfig, variants: list[str] | tuple[str, ...] = DEFAULT_VARIANTS,
            seeds: list[int] | tuple[int, ...] = (0,), output_dir: str | Path | None = None,
            target_accuracy: float | None = None, resume: bool = True) -> Comparison:
    """Runs every variant for every seed on `config` (same data partition: ``config.data.seed``) and writes
    ``comparison.md``, ``comparison.csv``, ``comparison.json`` and ``accuracy_vs_{round,bytes}.png``.

    Args:
        variants: ``algorithm`` or ``algorithm:execution`` strings.
        seeds: training seeds (model init, masks, sampling, shuffling).
        target_accuracy: for "rounds / bytes to reach"; default :func:`default_target` of the variants' final
            accuracies.
        resume: finish interrupted runs from their checkpoints instead of starting over.
    """
    parsed = [Variant.parse(v) for v in expand_variants(variants)]
    if not parsed or not seeds:
        raise ValueError("compare needs at least one variant and one seed")
    if len({v.label for v in parsed}) != len(parsed):
        raise ValueError(f"duplicate variants in {list(variants)}")
    config.validate()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(output_dir) if output_dir is not None else Path(config.output_dir) / f"{stamp}_compare"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[RunResult]] = {}
    for variant in parsed:
        for seed in seeds:
            run_config = variant.configure(config, seed)
            folder = out / run_config.name
            again = resume and (folder / "checkpoint.pt").is_file()  # otherwise: (re)started from scratch
            runs.setdefault(variant.label, []).append(run(run_config, output_dir=folder, resume=again,
                                                          overwrite=not again))
    if target_accuracy is None:
        target_accuracy = default_target([_mean_std([r.summary["final_acc_pooled"] for r in results])[0]
                                          for results in runs.values()])
    rows = [_row(label, results, target_accuracy) for label, results in runs.items()]
    markdown = format_table(rows, target_accuracy, config.data.evaluate_on)
    (out / "comparison.md").write_text(markdown)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import fedspa_kernels as fk

    info = fk.system_info()
    (out / "comparison.json").write_text(json.dumps({
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(), "variants": [v.label for v in parsed], "seeds": list(seeds),
        "target_accuracy": target_accuracy, "rows": rows,
        "machine": {k: info[k] for k in ("platform", "cpu_threads", "python", "torch", "triton", "fedspa")},
    }, indent=2))
    plot_comparison({label: [r.history for r in results] for label, results in runs.items()}, out, config,
                    len(seeds))
    return Comparison(out, rows, runs, target_accuracy, markdown)
