"""FedRep: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized Federated
Learning", ICML 2021. The head (here the last Linear layer) is personal, the body (representation) is federated.
Each round a client first trains its head for ``fedrep.head_epochs`` with the body frozen, then the body for
``local_epochs`` (or ``local_steps``) with the head frozen, and uploads the body; the server averages bodies."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import HEAD, TrainMetrics
from .fedavg import FedAvgClient, HeadPersonal
from .fedper import FedPerServer
from .registry import register


@dataclass
class FedRepConfig:
    head_epochs: int = 1  # epochs on the head before the body's update (the paper uses 10)

    def validate(self) -> None:
        if isinstance(self.head_epochs, bool) or self.head_epochs < 0:
            raise ValueError(f"head_epochs must be an integer >= 0, got {self.head_epochs!r}")


class FedRepClient(HeadPersonal, FedAvgClient):
    def train(self, model: nn.Module, round_index: int, measure_memory: bool) -> TrainMetrics:
        shared = set(self.shared_names)
        head = [p for n, p in model.named_parameters() if n not in shared and p.requires_grad]
        body = [p for n, p in model.named_parameters() if n in shared and p.requires_grad]
        flops = 0.0
        if self.config.fedrep.head_epochs > 0 and head:
            flops += self.local_train(model, round_index, epochs=self.config.fedrep.head_epochs, params=head,
                                      purpose=HEAD).flops
        metrics = self.local_train(model, round_index, params=body, measure_memory=measure_memory)
        metrics.flops += flops
        return metrics


register("fedrep", server=FedPerServer, client=FedRepClient, config=FedRepConfig)
