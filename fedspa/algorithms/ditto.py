"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021.

Each sampled client runs FedAvg's local update of the global model w and, in the same round, as many SGD steps
on its personal model v_k with the proximal loss f_k(v_k) + (lambda / 2) ||v_k - w||^2 (w as received;
``ditto.lambda``). v_k starts at the initial global model w^0 and lives only on the client (parameters and
buffers); clients are evaluated with v_k, so evaluation needs no downlink. Training FLOPs count both updates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .base import FINETUNE, TrainMetrics, check_tensors, load_state
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register


@dataclass
class DittoConfig:
    lambda_: float = 0.1  # weight of the proximal term pulling v_k towards the global model

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lambda_}")


class DittoServer(FedAvgServer):
    def evaluation_downlink(self, client: int, round_index: int) -> bytes:
        return b""  # clients are evaluated with v_k, which they hold


class DittoClient(FedAvgClient):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.personal_model: dict[str, torch.Tensor] | None = None  # v_k; None until first trained: w^0

    def _personal(self) -> nn.Module:
        model = self.models.make(self.device)  # w^0
        if self.personal_model is not None:
            load_state(model, self.personal_model)
        return model

    def train(self, model: nn.Module, round_index: int, measure_memory: bool) -> TrainMetrics:
        """FedAvg's update of the received w (uploaded), then the proximal update of v_k towards w as received."""
        reference = [p.detach().clone() for p in model.parameters()]
        metrics = super().train(model, round_index, measure_memory)
        personal = self._personal()
        params = list(personal.parameters())
        lam = self.config.ditto.lambda_

        def proximal() -> torch.Tensor:
            return 0.5 * lam * sum(((p - r) ** 2).sum() for p, r in zip(params, reference))

        personal_metrics = self.local_train(personal, round_index, extra_loss=proximal, purpose=FINETUNE)
        self.personal_model = {n: t.detach().clone() for n, t in personal.state_dict().items()}
        metrics.flops += personal_metrics.flops
        metrics.extra["personal_loss"] = personal_metrics.loss
        return metrics

    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        return self._personal()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.personal_model is not None:
            state.update({f"ditto.{n}": t.detach().clone() for n, t in self.personal_model.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = {k[len("ditto."):]: v for k, v in state.items() if k.startswith("ditto.")}
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("ditto.")})
        if not mine:
            self.personal_model = None
            return
        check_tensors("client state ditto", mine, self.models.shapes)
        self.personal_model = {n: v.to(self.device, self.models.dtypes[n]) for n, v in mine.items()}


register("ditto", server=DittoServer, client=DittoClient, config=DittoConfig)
