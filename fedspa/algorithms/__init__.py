"""Federated algorithms on one client/server machinery (``fedspa.algorithms.base``)."""

from __future__ import annotations

from .base import Algorithm, ClientResult
from .ditto import Ditto
from .fedavg import FedAvg, SplitFedAvg
from .fedavg_ft import FedAvgFT
from .fedper import FedPer
from .fedspa import FedSpa
from .lg_fedavg import LGFedAvg
from .local import Local
from .sub_fedavg import SubFedAvg

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedSpa, FedAvg, FedAvgFT, Local, Ditto, FedPer,
                                                                   LGFedAvg, SubFedAvg)}


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in REGISTRY:
        raise ValueError(f"algorithm {name!r} is not implemented; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Algorithm", "ClientResult", "Ditto", "FedAvg", "FedAvgFT", "FedPer", "FedSpa", "LGFedAvg",
           "Local", "SplitFedAvg", "SubFedAvg", "algorithm_class"]
