"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020. FedAvg whose local objective adds the proximal term (mu / 2) ||w - w^t||^2 to the received model
w^t (``fedprox.mu``), which keeps heterogeneous clients from drifting apart; aggregation is FedAvg's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import TrainMetrics
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register


@dataclass
class FedProxConfig:
    mu: float = 0.01  # weight of the proximal term

    def validate(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")


class FedProxClient(FedAvgClient):
    def train(self, model: nn.Module, round_index: int, measure_memory: bool) -> TrainMetrics:
        params = [p for p in model.parameters() if p.requires_grad]
        received = [p.detach().clone() for p in params]
        mu = self.config.fedprox.mu

        def proximal() -> torch.Tensor:
            return 0.5 * mu * sum(((p - r) ** 2).sum() for p, r in zip(params, received))

        return self.local_train(model, round_index, extra_loss=proximal, measure_memory=measure_memory)


register("fedprox", server=FedAvgServer, client=FedProxClient, config=FedProxConfig)
