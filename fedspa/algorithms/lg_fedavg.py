"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act Globally:
Federated Learning with Local and Global Representations", arXiv:2001.01523 (2020). Each client keeps its own
representation layers; only the global head (here the last Linear layer) is federated, so the payload is tiny."""

from __future__ import annotations

from .fedavg import SplitFedAvg, last_linear_names


class LGFedAvg(SplitFedAvg):
    name = "lg_fedavg"

    def is_shared(self, name: str) -> bool:
        if not hasattr(self, "_head"):
            self._head = last_linear_names(self.global_model)
        return name in self._head
