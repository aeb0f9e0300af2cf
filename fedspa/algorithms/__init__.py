"""Federated algorithms as two halves that speak bytes (``fedspa.algorithms.base``), registered in one place
(``fedspa.algorithms.registry``).

Built in, in this order: FedSpa, Sub-FedAvg, FedAvg, FedAvg-FT, Local, Ditto, FedPer, LG-FedAvg, FedProx, FedRep,
FedDST.
Add your own with :func:`register` (see ``docs/training.md``).
"""

from __future__ import annotations

from . import fedspa as _fedspa  # noqa: F401  (each module registers its algorithm, in this order)
from . import sub_fedavg as _sub_fedavg  # noqa: F401
from . import fedavg as _fedavg  # noqa: F401
from . import fedavg_ft as _fedavg_ft  # noqa: F401
from . import local as _local  # noqa: F401
from . import ditto as _ditto  # noqa: F401
from . import fedper as _fedper  # noqa: F401
from . import lg_fedavg as _lg_fedavg  # noqa: F401
from . import fedprox as _fedprox  # noqa: F401
from . import fedrep as _fedrep  # noqa: F401
from . import feddst as _feddst  # noqa: F401
from .base import (Client, EvalMetrics, ModelFactory, Server, TrainMetrics, Upload, decode_dense, encode_dense,
                   load_state)
from .fedavg import FedAvgClient, FedAvgServer, SharedEntries
from .fedspa import FedSpaClient, FedSpaConfig, FedSpaServer
from .registry import AlgorithmSpec, get, names, register, registered, unregister

__all__ = ["AlgorithmSpec", "Client", "EvalMetrics", "FedAvgClient", "FedAvgServer", "FedSpaClient", "FedSpaConfig",
           "FedSpaServer", "ModelFactory", "Server", "SharedEntries", "TrainMetrics", "Upload", "decode_dense",
           "encode_dense", "get", "load_state", "names", "register", "registered", "unregister"]
