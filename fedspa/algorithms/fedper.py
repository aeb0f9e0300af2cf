"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
arXiv:1912.00818 (2019). The base layers are federated (FedAvg); the head (here the last Linear layer) stays on
each client and is trained with the base."""

from __future__ import annotations

from .fedavg import FedAvgClient, FedAvgServer, HeadPersonal
from .registry import register


class FedPerServer(HeadPersonal, FedAvgServer):
    pass


class FedPerClient(HeadPersonal, FedAvgClient):
    pass


register("fedper", server=FedPerServer, client=FedPerClient)
