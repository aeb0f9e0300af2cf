"""Which way each masked Linear/Conv2d runs, measured rather than assumed: sparse kernels or dense weights x mask.

For every (layer shape, input shape, density, device, threads, versions) the client times one training step of the
layer alone (forward, input gradient where the layer needs one, weight gradient) both ways, once, and keeps the
faster. Each way's time is the fastest of its timed steps (noise from a shared machine only ever adds time), a
case whose two ways come out near the margin is timed three times as long before it is decided, and every case is
timed in two passes over the model's layers, keeping each way's faster time, so that neither a few slow steps nor
one busy moment decides it. Timings are cached in memory and on disk (``$FEDSPA_CACHE_DIR/layer_timings.json``, default
``~/.cache/fedspa``), the way Triton caches its autotuning: a machine measures a layer case once, and every process
using the cache (the clients of a simulation, the nodes of a Flower deployment on one machine) makes the same
choice. The file is locked while a case is measured, so concurrent processes never disagree; a cache file that is
unreadable or malformed is ignored (and rewritten), never trusted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .nn import mask_in_forward, sparse_layer_for

log = logging.getLogger("fedspa")

CACHE_VERSION = 2  # 1 kept medians of the timed steps, 2 the fastest
CACHE_FILE = "layer_timings.json"
DENSITY_STEP = 0.05  # densities are measured in buckets of this width (Sub-FedAvg's change every round)
REPEATS = 5  # timed steps per way (after one warm-up), the fastest taken
SPARSE_MARGIN = 0.9  # a layer runs sparse when its sparse step takes at most this share of the dense x mask one
BORDERLINE = 0.15  # a ratio within this share of the margin is timed with 3x the steps before it is decided
PASSES = 2  # every new case is timed once per pass over the layers; each way keeps its fastest


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """Everything a layer's timing depends on; its JSON is the cache key."""

    kind: str  # linear | conv2d
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    input_grad: bool  # does training need the gradient of the layer's input (not for the first layer)
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    density: float  # the bucket's centre
    dtype: str
    device: str
    threads: int
    versions: str

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Timing:
    sparse_ms: float
    masked_ms: float

    @property
    def choice(self) -> str:
        # sparse must win clearly: alone, a layer's timing misses what running sparse costs around it in a network
        # (layout changes of its input and output); near ties run faster as dense x mask in the client's round
        return "sparse" if self.sparse_ms <= SPARSE_MARGIN * self.masked_ms else "masked"


def cache_dir() -> Path:
    """``$FEDSPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedspa``, else ``~/.cache/fedspa``."""
    if os.environ.get("FEDSPA_CACHE_DIR"):
        return Path(os.environ["FEDSPA_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "fedspa"


def density_bucket(density: float) -> float:
    return round(min(max(round(density / DENSITY_STEP), 1), round(1 / DENSITY_STEP)) * DENSITY_STEP, 4)


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{device.type}:{model}"


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    import fedspa_kernels

    return f"torch {torch.__version__}, fedspa_kernels {getattr(fedspa_kernels, '__version__', '?')}"


def layer_case(module: nn.Module, mask: torch.Tensor, input_shape: tuple[int, ...], input_grad: bool) -> LayerCase:
    """The cache key of running `module` (a Linear or Conv2d) at `mask` on inputs of `input_shape`."""
    weight = module.weight
    conv = isinstance(module, nn.Conv2d)
    return LayerCase(
        kind="conv2d" if conv else "linear", weight_shape=tuple(weight.shape), input_shape=tuple(input_shape),
        input_grad=bool(input_grad), bias=module.bias is not None,
        stride=tuple(module.stride) if conv else (), padding=tuple(module.padding) if conv else (),
        dilation=tuple(module.dilation) if conv else (),
        density=density_bucket(int(mask.count_nonzero()) / mask.numel()), dtype=str(weight.dtype).replace("torch.", ""),
        device=_device_name(weight.device), threads=torch.get_num_threads(), versions=_versions())


def _step_ms(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    began = time.perf_counter()
    layer(x).backward(grad)
    sync()
    elapsed = (time.perf_counter() - began) * 1e3
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    return elapsed


def time_layer(module: nn.Module, mask: torch.Tensor, input_shape: tuple[int, ...], input_grad: bool,
               repeats: int = REPEATS) -> Timing:
    """The fastest ms of `repeats` training steps of `module` at `mask`, as a sparse layer and as dense weights x mask
    (random inputs of `input_shape`, alternating the two ways so that drift hits both); `2 * repeats` steps more
    each when the two ways' ratio is within ``BORDERLINE`` of ``SPARSE_MARGIN``."""
    sparse_kind = sparse_layer_for(module)
    if sparse_kind is None:
        raise ValueError(f"no sparse layer runs {type(module).__name__}")
    device, dtype = module.weight.device, module.weight.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(input_shape, generator=generator, dtype=dtype).to(device).requires_grad_(input_grad)
    sparse = sparse_kind.from_dense(copy.deepcopy(module), mask)
    masked = mask_in_forward(nn.Sequential(copy.deepcopy(module)), {"0.weight": mask})
    with torch.no_grad():
        grad = torch.randn_like(masked(x))
    times: dict[str, list[float]] = {"sparse": [], "masked": []}

    def measure(steps: int, start: int) -> Timing:
        for i in range(start, start + steps):
            for name, layer in (("sparse", sparse), ("masked", masked)) if i % 2 else (("masked", masked),
                                                                                      ("sparse", sparse)):
                elapsed = _step_ms(layer, x, grad)
                if i:  # the first round is the warm-up
                    times[name].append(elapsed)
        return Timing(min(times["sparse"]), min(times["masked"]))

    timing = measure(repeats + 1, 0)
    if abs(timing.sparse_ms / max(timing.masked_ms, 1e-9) / SPARSE_MARGIN - 1) <= BORDERLINE:
        timing = measure(2 * repeats, repeats + 1)
    return timing


class TimingCache:
    """Layer timings by case, in memory and in one JSON file (written atomically, under a lock)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, Timing] = {}

    def _read(self) -> dict[str, Timing]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            blob = json.loads(self.path.read_text())
            if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION:
                raise ValueError("another version")
            entries = {}
            for key, value in blob["entries"].items():
                sparse_ms, masked_ms = float(value["sparse_ms"]), float(value["masked_ms"])
                if not (isinstance(key, str) and math.isfinite(sparse_ms) and math.isfinite(masked_ms)
                        and sparse_ms >= 0 and masked_ms >= 0):
                    raise ValueError(f"a bad entry {key!r}")
                entries[key] = Timing(sparse_ms, masked_ms)
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("fedspa: ignoring the layer timing cache %s (%s); it is rebuilt", self.path, exc)
            return {}

    def _write(self) -> None:
        if self.path is None:
            return
        blob = {"version": CACHE_VERSION,
                "entries": {k: dataclasses.asdict(t) for k, t in sorted(self.entries.items())}}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(blob, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("fedspa: cannot write the layer timing cache %s (%s)", self.path, exc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115  (closed below)
        except OSError:
            yield  # a read-only cache folder: measure without sharing
            return
        with handle:
            try:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass
            yield

    def get(self, case: LayerCase, measure: Callable[[], Timing]) -> Timing:
        """The timing of `case`: from memory, else from the file, else measured (see :meth:`get_many`)."""
        return self.get_many({"": (case, measure)})[""]

    def get_many(self, requests: Mapping[str, tuple[LayerCase, Callable[[], Timing]]]) -> dict[str, Timing]:
        """Name -> the timing of its case: from memory, else from the file, else measured and stored in both.
        Cases not yet known are measured in ``PASSES`` passes, each calling every such case's `measure()` once (names
        sharing a case share its measurement), and each way keeps its fastest time over the passes: two timings of
        one case lie the other cases' measurements apart, so one busy moment of the machine does not decide it."""
        keys = {name: case.key() for name, (case, _) in requests.items()}
        if any(key not in self.entries for key in keys.values()):
            with self._locked():
                self.entries.update(self._read())
                missing = {}
                for name, key in keys.items():
                    if key not in self.entries:
                        missing.setdefault(key, requests[name][1])
                if missing:
                    passes = [{key: measure() for key, measure in missing.items()} for _ in range(PASSES)]
                    for key in missing:
                        self.entries[key] = Timing(min(p[key].sparse_ms for p in passes),
                                                   min(p[key].masked_ms for p in passes))
                    self._write()
        return {name: self.entries[key] for name, key in keys.items()}


_CACHES: dict[str, TimingCache] = {}


def default_cache() -> TimingCache:
    """The process's cache on the file under :func:`cache_dir` (one per folder)."""
    path = cache_dir() / CACHE_FILE
    return _CACHES.setdefault(str(path), TimingCache(path))


def layer_inputs(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Module name -> (input shape, whether training back-propagates into that input), from one forward of a
    copy of `model` on `batch` in eval mode (nothing of `model` changes)."""
    probe = copy.deepcopy(model).eval()
    seen: dict[str, tuple[tuple[int, ...], bool]] = {}
    handles = []
    for name in names:
        def hook(_module, inputs, name=name):
            seen.setdefault(name, (tuple(inputs[0].shape), bool(inputs[0].requires_grad)))
        handles.append(probe.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.enable_grad():
            probe(batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def fastest_sparse(model: nn.Module, masks: dict[str, torch.Tensor], batch: torch.Tensor,
                   cache: TimingCache | None = None,
                   inputs: dict[str, tuple[tuple[int, ...], bool]] | None = None) -> dict[str, Timing]:
    """For every masked weight a sparse layer could run (parameter name -> mask), its measured timing; the caller
    runs sparse those whose ``choice`` is ``"sparse"``. `inputs` (from :func:`layer_inputs`) saves the probe."""
    cache = cache if cache is not None else default_cache()
    candidates = {}
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr == "weight" and sparse_layer_for(module) is not None and not bool(mask.all()):
            candidates[name] = (module_name, module, mask)
    if inputs is None:
        inputs = layer_inputs(model, [m for m, _, _ in candidates.values()], batch)
    requests = {}
    for name, (module_name, module, mask) in candidates.items():
        if module_name not in inputs:  # never reached in the forward: nothing to gain either way
            continue
        shape, input_grad = inputs[module_name]
        case = layer_case(module, mask, shape, input_grad)
        requests[name] = (case, functools.partial(time_layer, module, mask, shape, input_grad))
    return cache.get_many(requests)
