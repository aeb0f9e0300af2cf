"""``fedspa.train.run(config)``: one federated experiment, simulated in one process, logged, checkpointed and
resumable.

The simulation is both halves of the algorithm (``fedspa.algorithms``) in one process: every round the server
half samples clients and encodes their downlinks, each client half trains from those bytes and answers with its
upload bytes and metrics, and the server half checks and aggregates what it received: nothing else passes
between them, exactly as across machines (``fedspa.flower`` runs the same halves on Flower).

Bring your own model, data and loss::

    run(config, model_fn=lambda: MyNet(), data=FederatedData.from_tensors(train, test), loss_fn=my_loss)

The output folder holds ``config.yaml`` (the config as run: ``model.name`` / ``data.dataset`` are ``custom`` when
given), ``run.json`` (what was really used: model class and parameter count, data description and hash, device,
versions), ``partition.json`` (which samples each client has, for config-built data), ``label_distribution.png``,
``metrics.jsonl`` / ``metrics.csv`` (one row per round), ``summary.json``, ``accuracy_vs_round.png``,
``accuracy_vs_bytes.png`` and ``checkpoint.pt`` (the server's and every client's state). A run killed mid-way
resumes from its last checkpoint (``resume=True``) and ends exactly as an uninterrupted run: every random draw
comes from (seed, client, round)-seeded generators, and the checkpoint holds both halves' whole state.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import logging
import math
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__, comm
from .algorithms import registry
from .algorithms.base import Client, LossFn, ModelFactory, Server, TrainMetrics, Upload
from .config import CUSTOM, ExperimentConfig, flatten
from .data import FederatedData, federated_data, plot_label_distribution
from .device import keep_freed_memory, resolve_device
from .models import build_model
from .plots import plot_run, setting

_log = logging.getLogger("fedspa")

CHECKPOINT_FORMAT = "fedspa-checkpoint"
CHECKPOINT_VERSION = 2
# fields that do not change what a run computes: a checkpoint may be resumed with other values
_NON_SEMANTIC = {"name", "output_dir", "progress", "threads", "checkpoint_every", "measure_memory", "device",
                 "tensorboard", "keep_freed_memory"}


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict]
    summary: dict


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, malformed, not fedspa's, or written by a different experiment."""


class RunExistsError(ValueError):
    """The output folder already holds a run, and neither resuming nor overwriting it was asked for."""


# what a run writes into its folder: all of it, and nothing else, is removed when a run is overwritten
RUN_FILES = ("checkpoint.pt", "checkpoint.tmp", "config.yaml", "run.json", "partition.json", "metrics.jsonl",
             "metrics.csv", "summary.json", "label_distribution.png", "accuracy_vs_round.png",
             "accuracy_vs_bytes.png", "run.log")
# run files whose presence means the folder holds a run
_RUN_MARKERS = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json")
# history fields every row has (summaries add them up)
_HISTORY_NUMBERS = ("bytes_up", "bytes_down", "flops", "train_seconds")


# ------------------------------------------------------------------------------------------------------------------
# A federation in one process
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Federation:
    """Both halves of an algorithm, built for one process: the server and one client half per client."""

    config: ExperimentConfig  # as run (model.name / data.dataset "custom" for a given model / data)
    spec: registry.AlgorithmSpec
    models: ModelFactory
    data: FederatedData
    server: Server
    clients: list[Client]
    device: torch.device

    def setup(self) -> dict:
        """What the run really uses (``run.json``, and checked on resume)."""
        return {"algorithm": self.spec.name, "model": self.models.describe(), "data": self.data.describe(),
                "device": str(self.device)}

    def round(self, round_index: int) -> tuple[list[int], list[Upload], dict[str, str], float]:
        """One training round: the sampled clients, the uploads aggregated, the clients dropped (client -> reason:
        an upload the server's ``receive`` refused) and the seconds spent profiling."""
        sampled = self.server.sample(round_index)
        uploads, received, dropped, profiling = [], [], {}, 0.0
        for position, k in enumerate(sampled):
            downlink = self.server.downlink(k, round_index)
            measure = self.config.measure_memory and position == 0
            payload, metrics = self.clients[k].round(downlink, round_index, measure_memory=measure)
            try:  # what a Flower server receives: the payload and the metrics as a record, both checked
                upload = Upload(k, payload, TrainMetrics.from_record(metrics.to_record()), len(downlink),
                                round_index)
                profiling += upload.metrics.profiling_seconds
                received.append(self.server.receive(upload))
            except Exception as exc:  # noqa: BLE001  (whatever is wrong with an upload drops that client only)
                dropped[str(k)] = f"malformed upload: {type(exc).__name__}: {exc}"
                _log.warning("round %d: client %d dropped (%s)", round_index + 1, k, dropped[str(k)])
                self.server.drop(k)
                continue
            uploads.append(upload)
        self.server.aggregate(received, round_index)
        return sampled, uploads, dropped, profiling

    def evaluate(self, round_index: int) -> dict:
        """Every client's personal model on its own test split: pooled accuracy and loss, mean/std over clients."""
        results = [client.evaluate(self.server.evaluation_downlink(k, round_index), round_index)
                   for k, client in enumerate(self.clients)]
        return evaluation_row(results)


def evaluation_row(results: list) -> dict:
    """The evaluation columns of a history row from per-client EvalMetrics (None: the client did not answer)."""
    per_client = [r.accuracy if r is not None else float("nan") for r in results]
    answered = [r for r in results if r is not None]
    correct = sum(r.correct for r in answered)
    total = sum(r.total for r in answered)
    values = np.array([a for a in per_client if not math.isnan(a)])
    loss = sum(r.loss * r.total for r in answered if r.total) / total if total else float("nan")
    return {"acc_pooled": correct / total if total else float("nan"),
            "acc_mean": float(values.mean()) if values.size else float("nan"),
            "acc_std": float(values.std()) if values.size else float("nan"),
            "test_loss": loss, "acc_per_client": per_client}


def train_row(round_index: int, lr: float, sampled: list[int], uploads: list[Upload], seconds: float) -> dict:
    """The training columns of a history row."""
    samples = sum(u.metrics.samples for u in uploads)
    peaks = [u.metrics.peak_memory for u in uploads if u.metrics.peak_memory is not None]
    return {
        "round": round_index + 1,
        "lr": lr,
        "sampled": sampled,
        "train_loss": sum(u.metrics.loss * u.metrics.samples for u in uploads) / max(samples, 1),
        "bytes_up": sum(len(u.payload) for u in uploads),
        "bytes_down": sum(u.bytes_down for u in uploads),
        "flops": sum(u.metrics.flops for u in uploads),
        "flops_per_client": sum(u.metrics.flops for u in uploads) / max(len(uploads), 1),
        "peak_memory": max(peaks) if peaks else None,
        "train_seconds": seconds,
    }


def federation(config: ExperimentConfig, *, model_fn: Callable[[], nn.Module] | None = None,
               data: FederatedData | None = None, loss_fn: LossFn | None = None) -> Federation:
    """Builds the server half and every client half of ``config.algorithm``.

    Args:
        config: the experiment (validated here).
        model_fn: returns a fresh model (default: the config's ``model``); called once, under the run's seed.
        data: the clients' data (default: the config's ``data``); the federation then has ``len(data.clients)``
            clients.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (default: cross-entropy).
    """
    config = config.copy().validate()
    spec = registry.get(config.algorithm)
    if data is None:
        if config.data.dataset == CUSTOM:
            raise ValueError("data.dataset=custom: pass the data itself (data=FederatedData(...))")
        data = federated_data(config.data, config.clients)
    else:
        if not isinstance(data, FederatedData):
            raise TypeError(f"data must be a fedspa.data.FederatedData, got {type(data).__name__}")
        data.check()
        if config.data.evaluate_on != "test":
            raise ValueError("data.evaluate_on=validation carves validation splits from the configured dataset; "
                             "with your own data, pass each client's validation set as its test set")
        config.data = type(config.data)(dataset=CUSTOM)
        config.clients = len(data.clients)
    if model_fn is None:
        if config.model.name == CUSTOM:
            raise ValueError("model.name=custom: pass the model itself (model_fn=...)")
        input_shape, num_classes = data.input_shape, data.num_classes
        model_fn = lambda: build_model(config.model, input_shape, num_classes)  # noqa: E731
    else:
        config.model = type(config.model)(name=CUSTOM)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
    device = resolve_device(config.device)
    models = ModelFactory(model_fn, config.seed)
    server = spec.server(config, models, len(data.clients), device)
    clients = [spec.client(config, k, client, models, device, loss_fn) for k, client in enumerate(data.clients)]
    return Federation(config, spec, models, data, server, clients, device)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------
def _semantic_differences(saved_config: dict, config: ExperimentConfig) -> list[tuple[str, object, object]]:
    """(field, saved, current) of the fields that change what the run computes and differ between a checkpoint's
    config and `config` (a field the checkpoint predates counts at its default)."""
    spec = registry.get(config.algorithm)
    relevant = set(spec.sections)
    other_sections = set(config.all_sections()) - relevant
    saved, current = flatten(saved_config), flatten(config.to_dict())
    defaults = flatten(ExperimentConfig().to_dict())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}  # fields added since: defaults
    return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if k.split(".")[0] not in _NON_SEMANTIC | other_sections and saved.get(k) != current.get(k)]


_PACKED = "packed_bool"  # a bool tensor stored as bits: {"packed_bool": uint8 bits, "shape": [...]}


def _pack(value: object) -> object:
    """`value` with every bool tensor stored as bits (np.packbits order): a mask costs numel / 8 bytes."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        bits = np.packbits(value.detach().cpu().reshape(-1).numpy())
        return {_PACKED: torch.from_numpy(bits), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pack(v) for v in value]
    return value


def _unpack(value: object, where: str = "checkpoint") -> object:
    """The inverse of `_pack`; a packed entry whose size, shape or padding bits do not fit raises ValueError."""
    if isinstance(value, dict) and set(value) == {_PACKED, "shape"}:
        bits, shape = value[_PACKED], value["shape"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                                 for d in shape)):
            raise ValueError(f"{where}: a packed mask has the shape {shape!r}")
        numel = math.prod(shape)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 \
                or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"{where}: a packed mask of shape {shape} needs {(numel + 7) // 8} uint8 bytes")
        try:
            flat = comm.unpack_bits(bits.numpy(), numel) if numel else np.zeros(0, np.uint8)
        except ValueError:
            raise ValueError(f"{where}: a packed mask of shape {shape} sets bits past its end") from None
        return torch.from_numpy(flat.astype(bool)).reshape(shape)
    if isinstance(value, dict):
        return {k: _unpack(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def read_checkpoint(path: str | Path) -> dict:
    """A run's ``checkpoint.pt`` as a dict (masks unpacked to bool tensors), without checking it against any
    experiment: for looking inside one (``state["server"]["masks"][k]``). ``--resume`` uses
    :func:`load_checkpoint`.

    Raises:
        CheckpointError: unreadable, or a packed mask that does not fit its shape.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from None
    try:
        return _unpack(state, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def load_checkpoint(path: Path, config: ExperimentConfig, setup: dict | None = None) -> dict:
    """The checkpoint at `path`, checked to belong to this experiment (and, given `setup`, to this model and data).

    Raises:
        CheckpointError: unreadable, not a fedspa checkpoint, another version, or another experiment's.
    """
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fedspa checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, this fedspa reads "
                              f"{CHECKPOINT_VERSION} (a checkpoint of an older fedspa cannot be resumed: start afresh)")
    _check_fields(path, state, config)
    try:
        differing = [d for d in _semantic_differences(state["config"], config) if d[0] != "rounds"]
    except Exception as exc:  # noqa: BLE001  (a config that cannot even be compared is malformed)
        raise CheckpointError(f"checkpoint {path}: its config is malformed ({type(exc).__name__}: {exc})") from None
    if differing:
        details = ", ".join(f"{k}: {saved!r} in the checkpoint, {current!r} now" for k, saved, current in differing)
        raise CheckpointError(f"checkpoint {path} was written by a different experiment ({details})")
    if setup is not None:
        saved_setup = state["setup"]
        for part, key in (("model", "layout_sha256"), ("model", "class"), ("data", "sha256")):
            saved = saved_setup.get(part)
            saved = saved.get(key) if isinstance(saved, dict) else None
            if saved != setup[part][key]:
                raise CheckpointError(f"checkpoint {path} was written with another {part} ({part}.{key}: "
                                      f"{saved!r} in the checkpoint, {setup[part][key]!r} now)")
    return state


def _check_fields(path: Path, state: dict, config: ExperimentConfig) -> None:
    """The checkpoint's own fields: present, of their types, the round within the history and the run."""
    types = {"config": dict, "setup": dict, "round": int, "server": dict, "clients": list, "history": list}
    for key, kind in types.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the field {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"checkpoint {path}: {key} must be a {kind.__name__}, got "
                                  f"{type(state[key]).__name__}")
    done, history = state["round"], state["history"]
    if not 0 <= done <= config.rounds:
        raise CheckpointError(f"checkpoint {path} has {done} rounds done; this run has rounds={config.rounds} "
                              f"(resume with rounds >= {done} to continue it)" if done > 0 else
                              f"checkpoint {path} has round {done}, which no run reaches")
    if len(history) != done:
        raise CheckpointError(f"checkpoint {path} has {done} rounds done but {len(history)} history rows")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or row.get("round") != i + 1:
            raise CheckpointError(f"checkpoint {path}: history row {i} must be a dict for round {i + 1}")
        for key in _HISTORY_NUMBERS:
            value = row.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CheckpointError(f"checkpoint {path}: history row {i} needs a finite number {key}, got "
                                      f"{value!r}")


def _restore(path: Path, state: dict, fed: Federation) -> None:
    """Loads both halves' states from a checked checkpoint; any problem is a CheckpointError naming it."""
    clients = state["clients"]
    if len(clients) != len(fed.clients):
        raise CheckpointError(f"checkpoint {path} holds {len(clients)} clients, the run has {len(fed.clients)}")
    parts = [("server state", fed.server, state["server"])]
    parts += [(f"client {k}'s state", client, s) for k, (client, s) in enumerate(zip(fed.clients, clients))]
    for what, half, part in parts:
        try:
            half.load_state_dict(part)
        except Exception as exc:  # noqa: BLE001  (whatever a malformed state raises, it is this checkpoint's fault)
            raise CheckpointError(f"checkpoint {path}: {what} is malformed: {type(exc).__name__}: {exc}") from None


def _save_checkpoint(path: Path, fed: Federation, round_index: int, history: list[dict], setup: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": fed.config.to_dict(),
                    "setup": setup, "round": round_index, "server": _pack(fed.server.state_dict()),
                    "clients": [_pack(c.state_dict()) for c in fed.clients], "history": history}, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it replaces the last good checkpoint
    os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_output(config: ExperimentConfig, label: str) -> Path:
    """``<config.output_dir>/<UTC time>_<label>``: a run's folder when none is given."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(config.output_dir) / f"{stamp}_{label}"


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Makes `out` ready for a run: refuses a file, or a folder holding a run unless it is resumed or overwritten
    (overwriting removes the run's own files, nothing else).

    Raises:
        ValueError: `out` is a file, or both `resume` and `overwrite` were asked for.
        RunExistsError: `out` holds a run and neither `resume` nor `overwrite` was asked for.
        CheckpointError: `resume`, but `out` holds no checkpoint.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a folder")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise CheckpointError(f"nothing to resume: {out} holds no checkpoint.pt")
        return
    held = [name for name in _RUN_MARKERS if (out / name).exists()]
    if held and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({', '.join(held)}); resume it (--resume) or replace it "
                             "(--overwrite)")
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        board = out / "tensorboard"
        if board.is_dir() and not board.is_symlink():  # only event files this run wrote
            for event in board.glob("events.out.tfevents.*"):
                event.unlink()
    out.mkdir(parents=True, exist_ok=True)


def summarize(history: list[dict], config: ExperimentConfig) -> dict:
    """Final and best personalized accuracy, totals of bytes/FLOPs/time, peak client memory."""
    evaluated = [h for h in history if "acc_pooled" in h]
    last = evaluated[-1] if evaluated else {}
    best = max(evaluated, key=lambda h: h["acc_pooled"]) if evaluated else {}
    peaks = [h["peak_memory"] for h in history if h.get("peak_memory")]
    return {
        "algorithm": config.algorithm,
        **registry.get(config.algorithm).describe(config),
        "rounds": len(history),
        "evaluated_on": config.data.evaluate_on,
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
        **({"final_mask_density": history[-1]["mask_density"]} if history and "mask_density" in history[-1] else {}),
        "dropped": {h["round"]: h["dropped"] for h in history if h.get("dropped")},  # round -> client -> reason
        "eval_dropped": {h["round"]: h["eval_dropped"] for h in history if h.get("eval_dropped")},
    }


def write_outputs(history: list[dict], config: ExperimentConfig, out: Path) -> dict:
    """What every runner (this one and the Flower server) writes after the last round: ``metrics.csv``,
    ``summary.json`` and the plots. Returns the summary."""
    columns: list[str] = []
    for h in history:  # the union, in first-seen order (rounds without evaluation lack the accuracies)
        columns += [k for k in h if k not in columns and k not in ("sampled", "acc_per_client", "dropped",
                                                                      "eval_dropped", "aggregated", "started")]
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for h in history:
            writer.writerow({k: h.get(k, "") for k in columns})
    plot_run(history, out, config, config.name)
    summary = summarize(history, config)
    summary["output_dir"] = str(out)
    partial = out / "summary.json.partial"  # summary.json appears last and whole (a launcher may poll for it)
    partial.write_text(json.dumps(summary, indent=2))
    partial.replace(out / "summary.json")
    return summary


@contextlib.contextmanager
def run_log(out: Path) -> Iterator[None]:
    """Meanwhile, everything the ``fedspa`` logger says (INFO and up) also goes to ``<out>/run.log``."""
    handler = logging.FileHandler(out / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("fedspa")
    handlers = [handler]
    if not logger.hasHandlers():  # what Python's last-resort handler would have shown: warnings on stderr
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handlers.append(console)
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(previous)


class TensorBoardLog:
    """The per-round numbers of a history row as TensorBoard scalars (``tensorboard=true``) in
    ``<out>/tensorboard``; does nothing when off."""

    SCALARS = ("train_loss", "acc_pooled", "acc_mean", "acc_std", "test_loss", "bytes_up", "bytes_down", "flops",
               "peak_memory", "train_seconds", "eval_seconds", "lr", "mask_density")

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError(f"tensorboard=true needs the tensorboard package (pip install tensorboard): "
                                 f"{exc}") from None
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def add(self, row: dict) -> None:
        if self.writer is None:
            return
        for key in self.SCALARS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, row["round"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run(config: ExperimentConfig, *, model_fn: Callable[[], nn.Module] | None = None,
        data: FederatedData | None = None, loss_fn: LossFn | None = None, output_dir: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, stop_after: int | None = None) -> RunResult:
    """Runs (or resumes) one experiment: both halves of ``config.algorithm`` simulated in this process.

    Args:
        config: the experiment (validated here).
        model_fn: returns a fresh ``nn.Module`` (default: the config's ``model``); called once, under the seed.
        data: a :class:`fedspa.data.FederatedData` (default: the config's ``data``); the federation then has
            ``len(data.clients)`` clients.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` for training and the reported test loss (default:
            cross-entropy); accuracy is the argmax of the logits.
        output_dir: where to write; default ``<config.output_dir>/<UTC time>_<config.name>``.
        resume: continue from ``output_dir/checkpoint.pt`` (which must exist); ``rounds`` may be larger than the
            checkpoint's (extending a finished run) when nothing else that changes the computation differs.
        overwrite: replace the run in `output_dir` (its files only) instead of refusing to.
        stop_after: stop after this many rounds in total (as if killed there), checkpoint included.

    Returns:
        The per-round history, the summary, and the output folder.

    Raises:
        RunExistsError: `output_dir` holds a run and neither `resume` nor `overwrite` was given.
        CheckpointError: the checkpoint to resume is missing, malformed, or another experiment's.
    """
    config.validate()
    if resume and output_dir is None:
        raise ValueError("resume needs the output folder of the run to continue (output_dir / --output)")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory and not keep_freed_memory():
        _log.debug("keep_freed_memory: not glibc on Linux, the allocator is left as it is")
    fed = federation(config, model_fn=model_fn, data=data, loss_fn=loss_fn)
    config = fed.config
    out = Path(output_dir) if output_dir is not None else default_output(config, config.name)
    prepare_output(out, resume=resume, overwrite=overwrite)
    with run_log(out):
        board = TensorBoardLog(out, config.tensorboard)  # before any file: a missing package leaves no run behind
        checkpoint = out / "checkpoint.pt"
        setup = fed.setup()

        history: list[dict] = []
        start = 0
        if resume:
            state = load_checkpoint(checkpoint, config, setup)
            _restore(checkpoint, state, fed)
            history = list(state["history"])
            start = state["round"]
            saved_rounds = state["config"].get("rounds")
            if saved_rounds != config.rounds:
                _log.info("resuming %s at round %d with rounds=%d (the checkpoint's run had rounds=%s)", out, start,
                          config.rounds, saved_rounds)
                config.save(out / "config.yaml")  # the run's folder describes the run it now is
        else:
            config.save(out / "config.yaml")
            versions = {"fedspa": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
            (out / "run.json").write_text(json.dumps({**setup, "versions": versions}, indent=2))
            if fed.data.partition is not None:
                (out / "partition.json").write_text(json.dumps(fed.data.partition))
            plot_label_distribution(fed.data.clients, fed.data.num_classes, out / "label_distribution.png",
                                        f"training labels per client: {setting(config)}")

        show = config.progress if config.progress is not None else sys.stderr.isatty()
        last = config.rounds if stop_after is None else min(config.rounds, stop_after)
        bar = tqdm(range(start, last), desc=config.name, disable=not show, initial=start, total=config.rounds)
        _log.info("run %s: %s, rounds %d to %d of %d", out, config.algorithm, start + 1, config.rounds if stop_after
                  is None else min(config.rounds, stop_after), config.rounds)
        with (out / "metrics.jsonl").open("w") as log:
            for h in history:
                log.write(json.dumps(h) + "\n")
            for t in bar:
                began = time.perf_counter()
                sampled, uploads, dropped, profiling = fed.round(t)
                row = train_row(t, fed.clients[0].learning_rate(t), sampled, uploads,
                                time.perf_counter() - began - profiling)
                row.update(fed.server.round_metrics())
                if dropped:
                    row["dropped"] = dropped
                if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                    began = time.perf_counter()
                    row.update(fed.evaluate(t))
                    row["eval_seconds"] = time.perf_counter() - began
                    bar.set_postfix(acc=f"{row['acc_pooled']:.3f}", loss=f"{row['train_loss']:.3f}")
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                board.add(row)
                _log.info("round %d: %s", row["round"], ", ".join(
                    f"{k} {row[k]:.4g}" for k in ("train_loss", "acc_pooled", "bytes_up", "bytes_down",
                                                  "train_seconds", "mask_density") if row.get(k) is not None))
                if (t + 1) % config.checkpoint_every == 0 or t + 1 == last:
                    _save_checkpoint(checkpoint, fed, t + 1, history, setup)
        bar.close()
        board.close()
        summary = write_outputs(history, config, out)
        _log.info("run finished: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return RunResult(out, history, summary)


def format_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"
