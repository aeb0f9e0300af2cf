"""FedAvg with local fine-tuning (FedAvg-FT): FedAvg's global model, which each client fine-tunes on its own
training data for ``fedavg_ft.epochs`` before it is evaluated — the standard personalized baseline (e.g. Wang et
al., "Federated Evaluation of On-device Personalization", arXiv:1910.10252, 2019). The fine-tuning runs at
evaluation time on every client; its cost is not part of the training FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import FINETUNE
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register


@dataclass
class FedAvgFTConfig:
    epochs: int = 1  # local fine-tuning epochs before evaluation

    def validate(self) -> None:
        if isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")


class FedAvgFTClient(FedAvgClient):
    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        model = self.received_model(downlink)
        epochs = self.config.fedavg_ft.epochs
        if epochs > 0:
            self.local_train(model, round_index, epochs=epochs, purpose=FINETUNE)
        return model


register("fedavg_ft", server=FedAvgServer, client=FedAvgFTClient, config=FedAvgFTConfig)
