"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act Globally:
Federated Learning with Local and Global Representations", arXiv:2001.01523 (2020). Each client keeps its own
representation layers; only the global head (here the last Linear layer) is federated, so the payload is tiny."""

from __future__ import annotations

from .fedavg import FedAvgClient, FedAvgServer, HeadShared
from .registry import register


class LGFedAvgServer(HeadShared, FedAvgServer):
    pass


class LGFedAvgClient(HeadShared, FedAvgClient):
    pass


register("lg_fedavg", server=LGFedAvgServer, client=LGFedAvgClient)
