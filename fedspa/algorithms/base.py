"""The two halves every algorithm is made of, and what they share.

A federated algorithm is a **server half** (:class:`Server`: the global state, client sampling, ``downlink``,
``receive`` and ``aggregate``) and a **client half** (:class:`Client`: one client's own data and state, ``round``
and ``evaluate``). The halves exchange only bytes in fedspa's wire format (:mod:`fedspa.comm`) plus typed metrics
(:class:`TrainMetrics`, :class:`EvalMetrics`), exactly as they would across machines: ``fedspa.train`` calls both
in one process, the Flower apps call one each.

One round, as every runner drives it::

    for k in server.sample(t):
        payload = server.downlink(k, t)                               # bytes to client k
        upload, metrics = clients[k].round(payload, t)                # bytes back, and TrainMetrics
        received.append(server.receive(Upload(k, upload, metrics, len(payload), t)))  # checked; may raise ValueError
    server.aggregate(received, t)

``evaluate`` works the same way with ``server.evaluation_downlink``. Every random draw comes from a CPU generator
seeded by (seed, client, round, purpose) (``fedspa.masks.client_generator``), so runs resume exactly and every
device draws the same numbers.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..config import ExperimentConfig
from ..data import ClientData
from ..masks import client_generator
from ..metrics import flop_counter_mode, peak_step_memory
from ..nn import training_memory_bytes

# purposes of the per-(client, round) generators
SHUFFLE, REGROW, SAMPLE, INIT, FINETUNE, HEAD, READJUST = 1, 2, 3, 4, 5, 6, 7

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
               *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


# ------------------------------------------------------------------------------------------------------------------
# What crosses between the halves besides payload bytes
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainMetrics:
    """What a client reports with its upload."""

    loss: float  # mean training loss over the samples seen
    samples: int  # training samples seen this round (the FedAvg weight)
    flops: float  # training FLOPs this round
    peak_memory: int | None = None  # bytes, when measured
    profiling_seconds: float = 0.0  # time spent measuring, excluded from the round time
    extra: dict[str, float] = field(default_factory=dict)  # algorithm-specific numbers (logged)

    def to_record(self) -> dict[str, int | float]:
        """A flat dict of numbers (e.g. a Flower MetricRecord)."""
        record: dict[str, int | float] = {"loss": float(self.loss), "samples": int(self.samples),
                                          "flops": float(self.flops),
                                          "profiling_seconds": float(self.profiling_seconds)}
        if self.peak_memory is not None:
            record["peak_memory"] = int(self.peak_memory)
        record.update({f"extra.{k}": float(v) for k, v in self.extra.items()})
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainMetrics:
        """Parses and checks a record sent by a client.

        Raises:
            ValueError: a missing key, a value of the wrong type, a non-finite number or a negative count.
        """
        loss = _number(record, "loss", float)
        samples = _number(record, "samples", int)
        flops = _number(record, "flops", float)
        profiling = _number(record, "profiling_seconds", float) if "profiling_seconds" in record else 0.0
        peak = _number(record, "peak_memory", int) if "peak_memory" in record else None
        if samples < 1 or flops < 0 or profiling < 0 or (peak is not None and peak < 0):
            raise ValueError(f"train metrics out of range: samples={samples}, flops={flops}, "
                             f"profiling_seconds={profiling}, peak_memory={peak}")
        extra = {k[len("extra."):]: _number(record, k, float) for k in record if str(k).startswith("extra.")}
        return cls(loss, samples, flops, peak, profiling, extra)


@dataclass
class EvalMetrics:
    """A client's evaluation of its personal model on its own test split."""

    correct: int
    total: int
    loss: float  # mean test loss

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_record(self) -> dict[str, int | float]:
        return {"correct": int(self.correct), "total": int(self.total), "loss": float(self.loss)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        """Raises ValueError for a missing key, a wrong type, or counts that do not fit 0 <= correct <= total."""
        correct, total = _number(record, "correct", int), _number(record, "total", int)
        loss = _number(record, "loss", float) if "loss" in record else float("nan")
        if not 0 <= correct <= total:
            raise ValueError(f"evaluation metrics out of range: correct={correct}, total={total}")
        return cls(correct, total, loss)


def _number(record: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in record:
        raise ValueError(f"metric {key!r} is missing (got {sorted(map(str, record))})")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"metric {key!r} must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"metric {key!r} must be finite, got {value!r}")
    return float(value)


@dataclass
class Upload:
    """One client's reply as the server receives it: the payload bytes, the metrics, and the size of the
    downlink that client was sent this round."""

    client: int
    payload: bytes
    metrics: TrainMetrics
    bytes_down: int = 0
    round_index: int | None = None  # the round the client trained in (the server ran it: not the client's word)


# ------------------------------------------------------------------------------------------------------------------
# The model both halves build
# ------------------------------------------------------------------------------------------------------------------
class ModelFactory:
    """The federation's model: ``model_fn()`` built once on the CPU under the run's seed (the initial model, the
    same on every node), then copied onto a device whenever a half needs a model.

    Args:
        model_fn: a callable returning a fresh ``nn.Module`` (the user's, or the config's).
        seed: the run's seed (the initial weights).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], seed: int) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a callable returning an nn.Module, got {type(model_fn).__name__}")
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            model = model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        self.template = model.to("cpu").train()
        state = self.template.state_dict()
        if not state:
            raise ValueError(f"{type(model).__name__} has no parameters or buffers to train")
        self.names = list(state)  # every entry of the model's state: parameters and persistent buffers
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}
        self.dtypes = {name: t.dtype for name, t in state.items()}
        for name, dtype in self.dtypes.items():
            if not (dtype.is_floating_point or dtype in (torch.int64, torch.int32, torch.bool)):
                raise TypeError(f"{name} is {dtype}: fedspa federates float, int and bool model state only")

    def make(self, device: torch.device | str) -> nn.Module:
        """A fresh copy of the initial model on `device`, in training mode."""
        try:
            model = copy.deepcopy(self.template)
        except Exception as exc:  # a model that cannot be copied cannot be federated by copies
            raise TypeError(f"{type(self.template).__name__} cannot be copied (copy.deepcopy: {exc})") from None
        return model.to(device).train()

    def initial_state(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Clones (CPU) of the initial values of the named state entries (default: all)."""
        state = self.template.state_dict()
        return {n: state[n].detach().clone() for n in (names if names is not None else self.names)}

    def norm_entries(self) -> set[str]:
        """Names of the state entries (parameters and statistics) of normalization layers."""
        out = set()
        for module_name, module in self.template.named_modules():
            if isinstance(module, NORM_LAYERS):
                prefix = f"{module_name}." if module_name else ""
                out |= {prefix + n for n in module.state_dict()}
        return out & set(self.names)

    def describe(self) -> dict:
        """What the run really used: the model's class, parameter count and state layout."""
        cls = type(self.template)
        parameters = sum(p.numel() for p in self.template.parameters())
        layout = ";".join(f"{n}:{self.shapes[n]}:{self.dtypes[n]}" for n in self.names)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "parameters": parameters,
                "trainable_parameters": sum(p.numel() for p in self.template.parameters() if p.requires_grad),
                "state_entries": len(self.names),
                "layout_sha256": hashlib.sha256(layout.encode()).hexdigest()}


def check_keys(what: str, state: object, keys: set[str]) -> None:
    """Raises ValueError unless `state` is a dict with exactly `keys`."""
    if not isinstance(state, dict):
        raise ValueError(f"{what} must be a dict, got {type(state).__name__}")
    if set(state) != keys:
        raise ValueError(f"{what} must hold {sorted(keys)}, got {sorted(map(str, state))}")


def check_tensors(what: str, values: object, shapes: Mapping[str, tuple[int, ...]], *,
                  dtype: torch.dtype | None = None) -> None:
    """Raises ValueError unless `values` maps exactly the names of `shapes` to tensors of those shapes (of `dtype`
    when given; floating ones finite)."""
    check_keys(what, values, set(shapes))
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shapes[name]):
            raise ValueError(f"{what} {name} must be a tensor of shape {tuple(shapes[name])}, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            raise ValueError(f"{what} {name} must be {dtype}, got {value.dtype}")
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what} {name} holds a non-finite value")


def load_state(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copies state entries (parameters or buffers, by ``state_dict`` name) into `model`, casting as needed
    (integer entries are rounded: they travel as float32)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, value in values.items():
            target = state[name]
            value = value.to(target.device).reshape(target.shape)
            if not target.dtype.is_floating_point and value.dtype.is_floating_point:
                value = value.round()
            target.copy_(value)


# ------------------------------------------------------------------------------------------------------------------
# The halves
# ------------------------------------------------------------------------------------------------------------------
def last_linear_names(model: nn.Module) -> set[str]:
    """State names of the model's last Linear layer (its classifier head)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as the head")
    return {f"{linears[-1]}.{p}" for p in model.get_submodule(linears[-1]).state_dict()}


class Server:
    """The server half of an algorithm.

    Subclasses implement ``downlink``, ``receive``, ``aggregate`` and, where they keep more than the global
    model, ``state_dict`` / ``load_state_dict``. Everything a client sends passes through ``receive`` (which checks
    it) before ``aggregate`` may use it; a server never reads client-side objects.

    Args:
        config: the experiment.
        models: the model factory (the initial global model is ``models.make(device)``).
        num_clients: how many clients the federation has (ids 0 .. num_clients - 1).
        device: where the global state lives and aggregation runs.
    """

    def __init__(self, config: ExperimentConfig, models: ModelFactory, num_clients: int,
                 device: torch.device) -> None:
        self.config = config
        self.models = models
        self.num_clients = int(num_clients)
        self.device = torch.device(device)
        self.global_model = models.make(self.device)

    # ------------------------------------------------------------------------------------------ the protocol
    def sample(self, round_index: int) -> list[int]:
        """The clients trained in round `round_index` (0-based), sorted: a seeded draw of ``client_fraction``."""
        count = max(1, int(round(self.config.client_fraction * self.num_clients)))
        order = torch.randperm(self.num_clients, generator=client_generator(self.config.seed, -1, SAMPLE, round_index),
                               device="cpu")
        return sorted(order[:count].tolist())

    def downlink(self, client: int, round_index: int) -> bytes:
        """The payload client `client` trains from in round `round_index`. Pure: changes no server state."""
        raise NotImplementedError

    def evaluation_downlink(self, client: int, round_index: int) -> bytes:
        """The payload client `client` evaluates its personal model from (default: its training downlink)."""
        return self.downlink(client, round_index)

    def receive(self, upload: Upload) -> Any:
        """Decodes and checks one upload against what the server expects; returns what ``aggregate`` takes.
        Changes no server state.

        Raises:
            ValueError: anything malformed (the runner drops that client for the round).
        """
        raise NotImplementedError

    def aggregate(self, received: list[Any], round_index: int) -> None:
        """Folds the checked uploads of one round (sorted by client) into the global state."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Numbers about the server's state after a round's aggregation, added to the history row (default: none;
        FedSpa and Sub-FedAvg: the mean density of the clients' masks)."""
        return {}

    def drop(self, client: int) -> None:
        """Client `client` was sent a downlink but its upload was refused or never came."""

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"global": {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output, every entry checked first (ValueError naming what is wrong)."""
        check_keys("server state", state, {"global"} | set(self.extra_state_keys))
        check_tensors("server state global", state["global"], self.models.shapes)
        load_state(self.global_model, state["global"])

    extra_state_keys: tuple[str, ...] = ()  # the keys a subclass adds to state_dict()


class Client:
    """The client half of an algorithm: one client, its own data and its own state.

    Subclasses implement ``round`` and ``evaluation_model`` (or ``evaluate``) and, where they keep personal
    state, ``state_dict`` / ``load_state_dict`` (a flat ``dict[str, Tensor]``: it is stored in a checkpoint, or in
    a Flower node's state between rounds).

    Args:
        config: the experiment.
        client_id: this client's id (it seeds the client's random draws).
        data: this client's data only.
        models: the model factory.
        device: where the client trains.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (default: cross-entropy).
    """

    def __init__(self, config: ExperimentConfig, client_id: int, data: ClientData, models: ModelFactory,
                 device: torch.device, loss_fn: LossFn | None = None) -> None:
        self.config = config
        self.client_id = int(client_id)
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.models = models
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy

    # ------------------------------------------------------------------------------------------ the protocol
    def round(self, downlink: bytes, round_index: int, *, measure_memory: bool = False) -> tuple[bytes, TrainMetrics]:
        """Trains from what the server sent; returns the upload and the metrics."""
        raise NotImplementedError

    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        """The model this client is evaluated with, built from the server's evaluation downlink."""
        raise NotImplementedError

    def evaluate(self, downlink: bytes, round_index: int) -> EvalMetrics:
        """Accuracy and loss of the personal model on this client's own test split."""
        return self.evaluate_model(self.evaluation_model(downlink, round_index))

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    # ------------------------------------------------------------------------------------------ helpers
    def learning_rate(self, round_index: int) -> float:
        return learning_rate(self.config, round_index)

    def local_train(self, model: nn.Module, round_index: int, *, epochs: int | None = None,
                    params: list[nn.Parameter] | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
                    purpose: int = SHUFFLE, measure_memory: bool = False, steps: int | None = None) -> TrainMetrics:
        """SGD on this client's training data (``local_steps`` or `epochs` / ``local_epochs`` epochs).

        Args:
            steps: this many minibatch steps instead.
            params: the parameters to train (default: all that require grad); the others are frozen meanwhile.
            extra_loss: added to the loss at every step (e.g. a proximal term).
            purpose: which seeded generator shuffles the data.
            measure_memory: profile the first step's peak memory.

        Returns:
            Mean loss, samples seen, training FLOPs (3 x the forward FLOPs measured on the first batch, per sample
            seen), the peak memory when measured.
        """
        cfg = self.config
        data = self.data
        trainable = [p for p in model.parameters() if p.requires_grad]
        parameters = params if params is not None else trainable
        chosen = {id(p) for p in parameters}
        frozen = [p for p in trainable if id(p) not in chosen]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.SGD(parameters, lr=self.learning_rate(round_index), momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        generator = client_generator(cfg.seed, self.client_id, purpose, round_index)
        n = data.num_train
        batches_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        if steps is not None:
            total_steps = steps
        elif cfg.local_steps is not None and epochs is None:
            total_steps = cfg.local_steps
        else:
            total_steps = (epochs if epochs is not None else cfg.local_epochs) * batches_per_epoch
        model.train()
        loss_sum, seen, peak, flops_per_sample = 0.0, 0, None, 0.0
        profiled_seconds, plain_seconds = None, []
        order = torch.randperm(n, generator=generator, device="cpu")
        try:
            for step in range(total_steps):
                position = step % batches_per_epoch
                if position == 0 and step > 0:
                    order = torch.randperm(n, generator=generator, device="cpu")
                batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size].to(self.device)
                x, y = data.train_x[batch], data.train_y[batch]

                def one_step(count_flops: bool = False):
                    nonlocal flops_per_sample
                    optimizer.zero_grad(set_to_none=True)
                    if count_flops:  # the real first batch, through the ops that really run
                        with flop_counter_mode() as counter:
                            logits = model(x)
                        flops_per_sample = 3.0 * counter.get_total_flops() / len(batch)
                    else:
                        logits = model(x)
                    loss = self.loss_fn(logits, y)
                    if extra_loss is not None:
                        loss = loss + extra_loss()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                    optimizer.step()
                    return loss

                began = time.perf_counter()
                if measure_memory and step == 0:
                    holder = {}

                    def measured():
                        holder["loss"] = one_step(count_flops=True)

                    persistent = training_memory_bytes(model, optimizer)["total"]
                    peak = peak_step_memory(measured, persistent, self.device)
                    loss = holder["loss"]
                    profiled_seconds = time.perf_counter() - began
                else:
                    loss = one_step(count_flops=step == 0)
                    plain_seconds.append(time.perf_counter() - began)
                loss_sum += float(loss.detach()) * len(batch)
                seen += len(batch)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        profiling = 0.0
        if profiled_seconds is not None and plain_seconds:
            # the profiled step is slower than a plain one: that excess is not training time
            profiling = max(0.0, profiled_seconds - sum(plain_seconds) / len(plain_seconds))
        return TrainMetrics(loss_sum / max(seen, 1), seen, flops_per_sample * seen, peak, profiling)

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module) -> EvalMetrics:
        """(correct, total, mean loss) of `model` on this client's own test split."""
        data = self.data
        model.eval()
        correct, loss_sum = 0, 0.0
        total = int(data.test_y.numel())
        for start in range(0, total, 512):
            x, y = data.test_x[start:start + 512], data.test_y[start:start + 512]
            logits = model(x)
            loss_sum += float(self.loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
        return EvalMetrics(correct, total, loss_sum / total if total else float("nan"))


def learning_rate(config: ExperimentConfig, round_index: int) -> float:
    """The local SGD learning rate of round `round_index` (0-based): ``lr * lr_decay ** round``."""
    return config.lr * config.lr_decay**round_index


def encode_dense(state: Mapping[str, torch.Tensor], names: list[str]) -> bytes:
    """The named state entries, dense, in order (empty bytes for none)."""
    return comm.encode([(state[n], None, False) for n in names]) if names else b""


def decode_dense(payload: bytes, names: list[str], shapes: Mapping[str, tuple[int, ...]],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A dense payload of the named entries, checked (tensor count, kinds, sizes, finite values), on `device`.

    Raises:
        ValueError: anything that does not match.
    """
    if not names:
        if payload:
            raise ValueError(f"expected an empty payload, got {len(payload)} bytes")
        return {}
    entries = comm.decode(payload, expect=[comm.Expect.dense(math.prod(shapes[n])) for n in names])
    return {name: entry.values.to(device) for name, entry in zip(names, entries)}
