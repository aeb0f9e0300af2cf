"""Typed experiment configuration: dataclasses, YAML/JSON files, ``key=value`` overrides, validation.

Every field has the default of the experiment `scripts/run.sh` runs (a small offline FedSpa experiment); the
paper's setting is in ``configs/paper_cifar10.yaml``. ``ExperimentConfig.validate()`` raises ValueError naming
the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

DATASETS = ("fashion_mnist", "mnist", "emnist", "femnist", "cifar10", "cifar100", "digits", "synthetic")
PARTITIONS = ("dirichlet", "pathological", "iid", "natural")
MODELS = ("mlp", "cnn", "resnet18")
ALGORITHMS = ("fedspa", "fedavg", "fedavg_ft", "local", "ditto", "fedper", "lg_fedavg", "sub_fedavg")
EXECUTIONS = ("sparse", "dense_masked")
MASK_INITS = ("erk", "uniform")
REGROWTHS = ("random", "gradient")
AGGREGATIONS = ("holders", "mean")
REGROWN_INITS = ("zero", "global")


@dataclass
class DataConfig:
    """Dataset and its split among clients."""

    dataset: str = "fashion_mnist"
    root: str | None = None  # directory of the dataset files; FEDSPA_DATA or the Debian location otherwise
    partition: str = "dirichlet"
    alpha: float = 0.3  # Dirichlet concentration
    classes_per_client: int = 2  # pathological partition
    samples_per_client: int | None = 600  # None: split the whole pool
    test_fraction: float = 0.2  # each client's own test split, same label mix as its training data
    seed: int = 0  # the partition's own seed


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: int = 32  # channels of the first conv (cnn), hidden units / 8 (mlp)


@dataclass
class FedSpaConfig:
    """The sparse-training parts (FedSpa and the sparse baselines)."""

    density: float = 0.1  # overall density of the sparsifiable weights
    mask_init: str = "erk"
    drop_fraction: float = 0.5  # alpha_0 of the cosine schedule
    mask_update_interval: int = 1  # rounds between mask updates
    regrowth: str = "random"
    regrown_init: str = "zero"
    aggregation: str = "holders"
    weighted_aggregation: bool = False  # weight clients by their data size
    execution: str = "sparse"  # dense_masked: dense weights x mask, the comparison most FL code runs
    sparse_max_density: float = 0.5  # sparse execution: denser layers run as dense weights x mask (break-even)
    prune_rate: float = 0.05  # sub_fedavg: fraction of the remaining weights pruned per round until the target


@dataclass
class ExperimentConfig:
    """One federated experiment."""

    name: str = "fedspa"
    algorithm: str = "fedspa"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fedspa: FedSpaConfig = field(default_factory=FedSpaConfig)
    clients: int = 10
    rounds: int = 30
    client_fraction: float = 0.5  # clients sampled per round
    local_epochs: int = 1
    local_steps: int | None = None  # instead of epochs, when set
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 0.998  # per round
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 10.0
    finetune_epochs: int = 1  # fedavg_ft, ditto's personal steps
    ditto_lambda: float = 0.1
    seed: int = 0
    eval_every: int = 1
    threads: int | None = None  # torch threads; None: torch's default
    output_dir: str = "runs"
    checkpoint_every: int = 1
    measure_memory: bool = True
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    # ---------------------------------------------------------------------------------------------- checking
    def validate(self) -> ExperimentConfig:
        """Raises ValueError for anything out of range; returns self."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("data.dataset", self.data.dataset, DATASETS)
        _choice("data.partition", self.data.partition, PARTITIONS)
        _choice("model.name", self.model.name, MODELS)
        _choice("fedspa.mask_init", self.fedspa.mask_init, MASK_INITS)
        _choice("fedspa.regrowth", self.fedspa.regrowth, REGROWTHS)
        _choice("fedspa.aggregation", self.fedspa.aggregation, AGGREGATIONS)
        _choice("fedspa.regrown_init", self.fedspa.regrown_init, REGROWN_INITS)
        _choice("fedspa.execution", self.fedspa.execution, EXECUTIONS)
        if not 0.0 < self.fedspa.density <= 1.0:
            raise ValueError(f"fedspa.density must lie in (0, 1], got {self.fedspa.density}")
        if not 0.0 <= self.fedspa.drop_fraction <= 1.0:
            raise ValueError(f"fedspa.drop_fraction must lie in [0, 1], got {self.fedspa.drop_fraction}")
        if not 0.0 <= self.fedspa.sparse_max_density <= 1.0:
            raise ValueError(f"fedspa.sparse_max_density must lie in [0, 1], got {self.fedspa.sparse_max_density}")
        if not 0.0 <= self.fedspa.prune_rate < 1.0:
            raise ValueError(f"fedspa.prune_rate must lie in [0, 1), got {self.fedspa.prune_rate}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must lie in (0, 1], got {self.client_fraction}")
        if not 0.0 < self.data.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {self.data.test_fraction}")
        if (self.data.partition == "natural") != (self.data.dataset == "femnist"):
            raise ValueError("data.partition=natural (one client per writer) goes with data.dataset=femnist, and "
                             f"femnist only with it; got {self.data.dataset} with {self.data.partition}")
        if self.data.alpha <= 0:
            raise ValueError(f"data.alpha must be > 0, got {self.data.alpha}")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "eval_every", "checkpoint_every",
                     "fedspa.mask_update_interval", "data.classes_per_client", "model.width"):
            value = self.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1 or null, got {self.local_steps}")
        if self.data.samples_per_client is not None and self.data.samples_per_client < 2:
            raise ValueError(f"data.samples_per_client must be >= 2 or null, got {self.data.samples_per_client}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr must be > 0 and lr_decay in (0, 1], got {self.lr} and {self.lr_decay}")
        if self.momentum < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("momentum and weight_decay must be >= 0 and grad_clip > 0")
        if self.finetune_epochs < 0 or self.ditto_lambda < 0:
            raise ValueError("finetune_epochs and ditto_lambda must be >= 0")
        return self

    # ---------------------------------------------------------------------------------------------- io
    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """Builds a config from nested dicts; unknown keys are an error."""
        return _build(cls, values, "")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
        """A YAML/JSON file (optional) plus ``dotted.key=value`` overrides (values parsed as YAML)."""
        values: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            text = p.read_text()
            values = (json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config file {p} must hold a mapping at the top level")
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. fedspa.density=0.2)")
            key, raw = item.split("=", 1)
            node = values
            parts = key.strip().split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {item!r}: {part} is not a section")
            node[parts[-1]] = yaml.safe_load(raw)
        return cls.from_dict(values).validate()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    text = str(hint)
    if value is None:
        if "None" not in text:
            raise ValueError(f"{name} must not be null")
        return None
    if "bool" in text and isinstance(value, bool):
        return value
    if "float" in text and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "int" in text and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "str" in text and isinstance(value, str):
        return value
    raise ValueError(f"{name} has the wrong type: {value!r} ({type(value).__name__}), expected {text}")
