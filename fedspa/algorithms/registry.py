"""The one place algorithms are registered: ``fedspa train``, ``fedspa compare``, the config's ``algorithm`` key,
its sections, the summary and the Flower apps all read it.

A new algorithm is one file that defines its halves (subclasses of ``fedspa.algorithms.Server`` and ``Client``),
optionally a dataclass of its hyper-parameters, and calls::

    register("fedprox", server=FedAvgServer, client=FedProxClient, config=FedProxConfig)

after which ``algorithm=fedprox`` and ``fedprox.mu=0.1`` work everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import config as _config
from .base import Client, Server


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm."""

    name: str
    server: type[Server]
    client: type[Client]
    config: type | None = None  # its config section (a dataclass), reached as config.<name>
    uses: tuple[str, ...] = ()  # other algorithms' sections it reads (sub_fedavg reads fedspa's)
    executions: tuple[str, ...] = ()  # values of fedspa.execution a `compare` variant may choose
    summary: Callable[[_config.ExperimentConfig], dict] | None = None  # extra summary fields

    @property
    def sections(self) -> tuple[str, ...]:
        """The config sections whose values change what this algorithm computes."""
        return ((self.name,) if self.config is not None else ()) + self.uses

    def describe(self, config: _config.ExperimentConfig) -> dict:
        """Summary fields: how the algorithm executed and at what density (dense methods: "dense", 1.0)."""
        base = {"execution": "dense", "density": 1.0}
        return {**base, **(self.summary(config) if self.summary is not None else {})}


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(name: str, *, server: type[Server], client: type[Client], config: type | None = None,
             uses: tuple[str, ...] = (), executions: tuple[str, ...] = (),
             summary: Callable[[_config.ExperimentConfig], dict] | None = None,
             replace: bool = False) -> AlgorithmSpec:
    """Registers an algorithm under `name`.

    Args:
        server, client: its halves (subclasses of ``Server`` and ``Client``).
        config: a dataclass of its hyper-parameters (every field with a default): the config section `name`.
        uses: names of other algorithms whose sections it reads.
        executions: values of ``fedspa.execution`` that ``compare`` may pick (``name:dense_masked``).
        summary: ``config -> dict`` of extra summary fields (e.g. its execution and density).
        replace: allow re-registering an existing name.

    Raises:
        ValueError: an invalid or taken name; TypeError: halves that are not Server/Client subclasses.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an algorithm name must be an identifier, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {name!r} is already registered (pass replace=True to replace it)")
    if not (isinstance(server, type) and issubclass(server, Server)):
        raise TypeError(f"server must be a subclass of fedspa.algorithms.Server, got {server!r}")
    if not (isinstance(client, type) and issubclass(client, Client)):
        raise TypeError(f"client must be a subclass of fedspa.algorithms.Client, got {client!r}")
    if config is not None:
        _config.register_section(name, config)
    spec = AlgorithmSpec(name, server, client, config, tuple(uses), tuple(executions), summary)
    _REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes a registered algorithm (and its config section)."""
    spec = _REGISTRY.pop(name, None)
    if spec is not None and spec.config is not None:
        _config.unregister_section(name)


def get(name: str) -> AlgorithmSpec:
    """The algorithm registered as `name`.

    Raises:
        ValueError: naming the registered ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"algorithm {name!r} is not registered; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered algorithm names, in registration order."""
    return list(_REGISTRY)


def registered() -> dict[str, AlgorithmSpec]:
    """A copy of the registry (name -> spec)."""
    return dict(_REGISTRY)
