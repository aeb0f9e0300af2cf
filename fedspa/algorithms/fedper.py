"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
arXiv:1912.00818 (2019). The base layers are federated (FedAvg); the head (here the last Linear layer) stays on
each client and is trained with the base."""

from __future__ import annotations

from .fedavg import SplitFedAvg, last_linear_names


class FedPer(SplitFedAvg):
    name = "fedper"

    def is_shared(self, name: str) -> bool:
        if not hasattr(self, "_head"):
            self._head = last_linear_names(self.global_model)
        return name not in self._head
