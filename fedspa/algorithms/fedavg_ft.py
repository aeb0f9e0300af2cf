"""FedAvg with local fine-tuning (FedAvg-FT): FedAvg's global model, which each client fine-tunes on its own
training data for ``finetune_epochs`` before it is evaluated — the standard personalized baseline (e.g. Wang et
al., "Federated Evaluation of On-device Personalization", arXiv:1910.10252, 2019). The fine-tuning runs at
evaluation time on every client; its cost is not part of the training FLOPs."""

from __future__ import annotations

from torch import nn

from .base import FINETUNE
from .fedavg import FedAvg


class FedAvgFT(FedAvg):
    name = "fedavg_ft"

    def run_round(self, round_index: int):
        self.current_round = round_index
        return super().run_round(round_index)

    def personal_model(self, client: int) -> nn.Module:
        model = super().personal_model(client)
        if self.config.finetune_epochs > 0:
            round_index = getattr(self, "current_round", 0)
            self.local_train(model, client, round_index, self.learning_rate(round_index),
                             epochs=self.config.finetune_epochs, purpose=FINETUNE)
        return model
