"""The figures a run and a comparison write: accuracy against rounds, bytes and training FLOPs.

Every figure has a title stating the setting, integer ticks on round axes, spreads clipped to [0, 1] (accuracies),
and one distinct colour, line style and marker per method, so overlapping curves stay distinguishable in print.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .config import ExperimentConfig

# colour-blind-safe colours (Okabe-Ito) x line styles x markers: no two methods share all three
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_LINES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def style(index: int) -> dict:
    """Line keyword arguments for the `index`-th method of a figure: earlier methods are drawn wider and every
    other one with hollow markers, so a curve lying exactly on another (sparse vs dense-masked execution of the
    same math) still shows."""
    turn = index + index // len(_COLOURS)  # after every colour once, line style and marker move on by one
    return {"color": _COLOURS[index % len(_COLOURS)], "linestyle": _LINES[turn % len(_LINES)],
            "marker": _MARKERS[turn % len(_MARKERS)], "markersize": 6 - (index % 2) * 1.5,
            "linewidth": max(1.2, 3.0 - 0.6 * index), **({"markerfacecolor": "none"} if index % 2 else {})}


def setting(config: ExperimentConfig) -> str:
    """One line naming the experiment's setting, for a figure title."""
    data = config.data
    split = {"dirichlet": f"Dirichlet({data.alpha:g})", "pathological": f"{data.classes_per_client} classes/client",
             "iid": "IID", "natural": "natural split"}.get(data.partition, data.partition)
    epochs = f"{config.local_steps} local steps" if config.local_steps else f"{config.local_epochs} local epoch" + \
        ("s" if config.local_epochs != 1 else "")
    return (f"{data.dataset}, {split}, {config.clients} clients x {config.client_fraction:g}, {config.model.name}, "
            f"{epochs}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, x: str, title: str, path: Path, note: str = "", split: str = "test") -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:  # bytes or FLOPs: a log axis labelled in plain numbers (1, 2, 5, 10, ... within two decades)
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        if high / max(low, 1e-300) < 100:
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        else:
            ax.xaxis.set_major_locator(LogLocator(base=10, numticks=10))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(_AXES[x] + (f"\n{note}" if note else ""))
    ax.set_ylabel(f"personalized {split} accuracy (pooled)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=min(1.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3, which="major")
    labels = ax.get_legend_handles_labels()[1]
    if len(labels) <= 3:
        ax.legend(fontsize="small", loc="best")
    else:  # many methods: below the axes, where no curve runs
        longest = max(len(label) for label in labels)
        columns = 1 if longest > 40 else 2 if longest > 18 else 3
        width, height = fig.get_size_inches()
        fig.set_size_inches(width, height + 0.2 * math.ceil(len(labels) / columns))
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.26 if note else -0.17),
                  ncol=columns, frameon=False)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


_AXES = {"round": "round", "bytes": "MB communicated (up + down, cumulative)",
         "flops": "training GFLOP (all clients, cumulative)"}


def _x(history: Sequence[Mapping], x: str) -> tuple[list[float], list[int]]:
    """The x value of every evaluated round, and which rows those are."""
    xs, rows, total = [], [], 0.0
    for i, h in enumerate(history):
        total += (h["bytes_up"] + h["bytes_down"]) / 1e6 if x == "bytes" else h["flops"] / 1e9 if x == "flops" else 0
        if h.get("acc_pooled") is not None and not math.isnan(h["acc_pooled"]):
            xs.append(h["round"] if x == "round" else total)
            rows.append(i)
    return xs, rows


def plot_run(history: Sequence[Mapping], out: Path, config: ExperimentConfig, label: str) -> list[Path]:
    """``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` of one run: the pooled accuracy and the mean over
    clients with its spread (± one std over clients, clipped to [0, 1])."""
    plt = _pyplot()
    written = []
    for x in ("round", "bytes"):
        xs, rows = _x(history, x)
        if not xs or (x != "round" and xs[0] <= 0):  # nothing evaluated, or nothing communicated (local)
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        pooled = [history[i]["acc_pooled"] for i in rows]
        mean = np.array([history[i]["acc_mean"] for i in rows], dtype=float)
        std = np.nan_to_num(np.array([history[i]["acc_std"] for i in rows], dtype=float))
        ax.plot(xs, pooled, label=f"{label}: pooled", **style(0))
        ax.plot(xs, mean, label=f"{label}: mean over clients", **style(1))
        ax.fill_between(xs, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=style(1)["color"],
                        alpha=0.15, label="± std over clients")
        path = out / f"accuracy_vs_{x}.png"
        _finish(fig, ax, x, f"{label}: {setting(config)}", path, split=config.data.evaluate_on)
        written.append(path)
    return written


def plot_comparison(runs: Mapping[str, Sequence[Sequence[Mapping]]], out: Path, config: ExperimentConfig,
                    seeds: int) -> list[Path]:
    """``accuracy_vs_{round,bytes,flops}.png`` of a comparison: per method the mean over seeds and, with several
    seeds, its spread (min to max over seeds)."""
    plt = _pyplot()
    written = []
    for x in ("round", "bytes", "flops"):
        fig, ax = plt.subplots(figsize=(6.8, 4.6))
        silent = []  # methods that communicate nothing: no place on a bytes axis
        for index, (label, histories) in enumerate(runs.items()):
            curves = [_x(h, x) for h in histories]
            length = min(len(xs) for xs, _ in curves)
            if length == 0:
                continue
            xs = np.mean([xs[:length] for xs, _ in curves], axis=0)
            ys = np.array([[h[i]["acc_pooled"] for i in rows[:length]] for h, (_, rows) in zip(histories, curves)])
            if x != "round" and xs[0] <= 0:
                silent.append(label)
                continue
            ax.plot(xs, ys.mean(0), label=label, markevery=max(1, length // 10), **style(index))
            if len(histories) > 1:
                ax.fill_between(xs, np.clip(ys.min(0), 0, 1), np.clip(ys.max(0), 0, 1), alpha=0.12,
                                color=style(index)["color"])
        spread = f"\nmean and min-max over {seeds} seeds" if seeds > 1 else ""
        path = out / f"accuracy_vs_{x}.png"
        note = f"not shown (nothing communicated): {', '.join(silent)}" if silent else ""
        _finish(fig, ax, x, f"{setting(config)}{spread}", path, note, split=config.data.evaluate_on)
        written.append(path)
    return written
