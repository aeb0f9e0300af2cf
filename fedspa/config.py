"""Typed experiment configuration: dataclasses, YAML/JSON files, ``key=value`` overrides, validation.

Every field has the default of the experiment `scripts/run.sh` runs (a small offline FedSpa experiment); the
paper's setting is in ``configs/paper_cifar10.yaml``. ``ExperimentConfig.validate()`` raises ValueError naming
the field and the allowed values.

The fields shared by every algorithm live on :class:`ExperimentConfig`; each algorithm's own hyper-parameters live
in its *section* (``fedspa:``, ``ditto:``, ``fedprox:``, ...), a dataclass registered with the algorithm
(``fedspa.algorithms.register(name, ..., config=SectionClass)``). A section field whose name ends in ``_`` (a
Python keyword such as ``lambda_``) is spelled without it in files and overrides (``ditto.lambda=0.5``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

DATASETS = ("fashion_mnist", "mnist", "emnist", "femnist", "cifar10", "cifar100", "digits", "synthetic", "custom")
PARTITIONS = ("dirichlet", "pathological", "iid", "natural")
EVALUATION_SPLITS = ("test", "validation")
MODELS = ("mlp", "cnn", "resnet18", "custom")
NORM_LAYERS = ("shared", "local")
CUSTOM = "custom"  # model.name / data.dataset of a run given its own model_fn / data

RUN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,99}")
MAX_SEED = 2**32  # seeds lie in [0, 2**32): what every generator we seed (numpy, torch) accepts
MAX_INT = 2**31 - 1  # no integer setting needs more; larger ones fail later, deep inside a library

# keys that moved into an algorithm's section: the old spelling is an error that names the new one
MOVED_KEYS = {"ditto_lambda": "ditto.lambda", "finetune_epochs": "fedavg_ft.epochs",
              "fedspa.prune_rate": "sub_fedavg.prune_rate"}

# section name -> dataclass of its fields, filled by fedspa.algorithms.register
_SECTIONS: dict[str, type] = {}


def _builtin_algorithms() -> None:
    """Registers the built-in algorithms and their sections (on first use: fedspa.algorithms imports this module)."""
    import fedspa.algorithms  # noqa: F401


def register_section(name: str, cls: type) -> None:
    """Makes `cls` (a dataclass with defaults for every field) the config section `name`."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"the config section of {name!r} must be a dataclass type, got {cls!r}")
    try:
        cls()
    except TypeError as exc:
        raise TypeError(f"the config section {cls.__name__} of {name!r} needs a default for every field: "
                        f"{exc}") from None
    if name in {f.name for f in dataclasses.fields(ExperimentConfig)}:
        raise ValueError(f"{name!r} is an ExperimentConfig field; an algorithm section cannot take that name")
    _SECTIONS[name] = cls


def unregister_section(name: str) -> None:
    _SECTIONS.pop(name, None)


def sections() -> dict[str, type]:
    """The registered config sections (name -> dataclass)."""
    _builtin_algorithms()
    return dict(_SECTIONS)


@dataclass
class DataConfig:
    """Dataset and its split among clients."""

    dataset: str = "fashion_mnist"
    root: str | None = None  # directory of the dataset files; FEDSPA_DATA or the Debian location otherwise
    partition: str = "dirichlet"
    alpha: float = 0.3  # Dirichlet concentration
    classes_per_client: int = 2  # pathological partition
    samples_per_client: int | None = 400  # None: split the whole pool
    test_fraction: float = 0.2  # each client's own test split, same label mix as its training data
    # validation: the test split is set aside unread and every personal model is evaluated on validation_fraction
    # of the client's training data instead (choose hyper-parameters this way, never on the test split)
    evaluate_on: str = "test"
    validation_fraction: float = 0.2
    seed: int = 0  # the partition's own seed


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: int = 32  # channels of the first conv (cnn), hidden units / 8 (mlp)


@dataclass(eq=False)
class ExperimentConfig:
    """One federated experiment. Algorithm sections are reached as attributes (``config.fedspa.density``)."""

    name: str = "fedspa"
    algorithm: str = "fedspa"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clients: int = 10
    rounds: int = 20
    client_fraction: float = 0.5  # clients sampled per round
    local_epochs: int = 5
    local_steps: int | None = None  # instead of epochs, when set
    batch_size: int = 128
    lr: float = 0.1
    lr_decay: float = 0.998  # per round
    momentum: float = 0.0
    weight_decay: float = 5e-4
    grad_clip: float = 10.0
    norm_layers: str = "shared"  # local: normalization layers (parameters and statistics) never leave the client
    seed: int = 0
    eval_every: int = 1
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    threads: int | None = None  # torch threads; None: torch's default
    keep_freed_memory: bool = True  # glibc keeps freed memory for reuse (fedspa.device.keep_freed_memory)
    output_dir: str = "runs"
    checkpoint_every: int = 1
    measure_memory: bool = True
    tensorboard: bool = False  # also log the per-round metrics for TensorBoard (<run folder>/tensorboard)
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    sections: dict[str, Any] = field(default_factory=dict, repr=False)  # algorithm sections, by name

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails: the algorithm sections
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        sections_ = self.__dict__.get("sections")
        _builtin_algorithms()
        if sections_ is not None and name in _SECTIONS:
            if name not in sections_:  # registered after this config was made: its defaults
                sections_[name] = _SECTIONS[name]()
            return sections_[name]
        raise AttributeError(f"ExperimentConfig has no field or algorithm section {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExperimentConfig) and self.to_dict() == other.to_dict()

    # ---------------------------------------------------------------------------------------------- checking
    def validate(self) -> ExperimentConfig:
        """Raises ValueError for anything out of range; returns self."""
        from .algorithms import registry  # the algorithm names live with the algorithms

        _choice("algorithm", self.algorithm, tuple(registry.names()))
        _choice("data.dataset", self.data.dataset, DATASETS)
        _choice("data.partition", self.data.partition, PARTITIONS)
        _choice("model.name", self.model.name, MODELS)
        _choice("norm_layers", self.norm_layers, NORM_LAYERS)
        if not isinstance(self.name, str) or not RUN_NAME.fullmatch(self.name):
            raise ValueError(f"name must be 1-100 letters, digits, '.', '_', '+' or '-' and not start with '.' "
                             f"(it names the run's folder under output_dir), got {self.name!r}")
        seeds = ("seed", "data.seed")
        for name in seeds:
            if not 0 <= self.get(name) < MAX_SEED:
                raise ValueError(f"{name} must lie in [0, 2**32), got {self.get(name)}")
        for name, value in _flatten(self.to_dict()).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and name not in seeds and \
                    not -MAX_INT <= value <= MAX_INT:
                raise ValueError(f"{name} must lie in [-{MAX_INT}, {MAX_INT}], got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1 or null (torch's default), got {self.threads}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must lie in (0, 1], got {self.client_fraction}")
        if not 0.0 < self.data.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {self.data.test_fraction}")
        _choice("data.evaluate_on", self.data.evaluate_on, EVALUATION_SPLITS)
        if not 0.0 < self.data.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must lie in (0, 1), got {self.data.validation_fraction}")
        if (self.data.partition == "natural") != (self.data.dataset == "femnist") and self.data.dataset != CUSTOM:
            raise ValueError("data.partition=natural (one client per writer) goes with data.dataset=femnist, and "
                             f"femnist only with it; got {self.data.dataset} with {self.data.partition}")
        if self.data.alpha <= 0:
            raise ValueError(f"data.alpha must be > 0, got {self.data.alpha}")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "eval_every", "checkpoint_every",
                     "data.classes_per_client", "model.width"):
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
            raise ValueError("momentum and weight_decay must be >= 0 and grad_clip > 0, got "
                             f"{self.momentum}, {self.weight_decay} and {self.grad_clip}")
        from .device import check_device_string

        check_device_string(self.device)
        for name, section in self.all_sections().items():
            check = getattr(section, "validate", None)
            if check is not None:
                try:
                    check()
                except ValueError as exc:
                    raise ValueError(f"{name}.{exc}" if not str(exc).startswith(name + ".") else str(exc)) from None
        return self

    # ---------------------------------------------------------------------------------------------- io
    def all_sections(self) -> dict[str, Any]:
        """Every registered algorithm section of this config (defaults where none was given)."""
        _builtin_algorithms()
        return {name: getattr(self, name) for name in _SECTIONS}

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, _field_name(node, part))
        return node

    def to_dict(self) -> dict:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        for name, section in self.all_sections().items():
            out[name] = _plain(section)
        return out

    def copy(self) -> ExperimentConfig:
        return copy.deepcopy(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """Builds a config from nested dicts; unknown keys are an error."""
        if not isinstance(values, dict):
            raise ValueError(f"config must be a mapping, got {reprlib.repr(values)}")
        _builtin_algorithms()
        for old, new in MOVED_KEYS.items():
            section, _, key = old.rpartition(".")
            holder = values.get(section) if section else values
            if isinstance(holder, dict) and key in holder:
                raise ValueError(f"config key {old} is now {new}")
        plain = {k: v for k, v in values.items() if k not in _SECTIONS}
        if "sections" in plain:
            raise ValueError("unknown config key(s) sections")
        config = _build(cls, plain, "", extra_known=sorted(_SECTIONS))
        for name, cls_ in _SECTIONS.items():
            if name in values:
                config.sections[name] = _build(cls_, values[name], f"{name}.")
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
        """A YAML/JSON file (optional) plus ``dotted.key=value`` overrides (values parsed as YAML)."""
        values: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            try:
                text = p.read_text()
                values = (json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)) or {}
            except (yaml.YAMLError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ValueError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                                 f"{_one_line(exc)}") from None
            if not isinstance(values, dict):
                raise ValueError(f"config file {p} must hold a mapping at the top level")
        apply_overrides(values, overrides or [])
        return cls.from_dict(values).validate()

    def overridden(self, overrides: list[str]) -> ExperimentConfig:
        """A copy with ``dotted.key=value`` overrides applied (checked as :meth:`load` checks them)."""
        values = self.to_dict()
        apply_overrides(values, overrides)
        return type(self).from_dict(values).validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``"fedspa.density=0.2"`` -> ``("fedspa.density", 0.2)`` (the value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. fedspa.density=0.2)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: the value is not valid YAML: {_one_line(exc)}") from None


def apply_overrides(values: dict, overrides: list[str]) -> None:
    """Sets every ``dotted.key=value`` of `overrides` in the nested dict `values`, in place."""
    for item in overrides:
        key, value = parse_override(item)
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _field_name(node: Any, key: str) -> str:
    """The attribute behind a config key: ``lambda`` -> ``lambda_`` where the dataclass spells it so."""
    if dataclasses.is_dataclass(node) and not hasattr(node, key) and hasattr(node, key + "_"):
        return key + "_"
    return key


def _key(field_name: str) -> str:
    return field_name[:-1] if field_name.endswith("_") else field_name


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_key(f.name): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten(d: dict) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    return _flatten(d)


def _build(cls, values: dict, prefix: str, extra_known: list[str] = ()):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {reprlib.repr(values)}")
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: keys must be strings, got {reprlib.repr(bad_keys)}")
    hints = get_type_hints(cls)
    fields = {_key(f.name): f.name for f in dataclasses.fields(cls) if f.name != "sections"}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; known: "
                         f"{', '.join(sorted(set(fields) | set(extra_known)))}")
    kwargs = {}
    for key, value in values.items():
        name = fields[key]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{key}", value, hint)
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
    raise ValueError(f"{name} has the wrong type: {reprlib.repr(value)} ({type(value).__name__}), expected {text}")
