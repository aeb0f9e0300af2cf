"""Federated algorithms on one client/server machinery (``fedspa.algorithms.base``)."""

from __future__ import annotations

from .base import Algorithm, ClientResult
from .fedavg import FedAvg
from .fedspa import FedSpa

REGISTRY: dict[str, type[Algorithm]] = {"fedspa": FedSpa, "fedavg": FedAvg}


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in REGISTRY:
        raise ValueError(f"algorithm {name!r} is not implemented; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Algorithm", "ClientResult", "FedAvg", "FedSpa", "algorithm_class"]
