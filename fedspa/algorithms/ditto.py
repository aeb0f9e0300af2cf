"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021.

Each sampled client runs FedAvg's local update of the global model w and, in the same round, as many SGD steps
on its personal model v_k with the proximal loss f_k(v_k) + (lambda / 2) ||v_k - w||^2 (w as received). Clients
are evaluated with v_k. Training FLOPs count both updates."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..metrics import training_flops_per_sample
from .base import FINETUNE, ClientResult
from .fedavg import FedAvg


class Ditto(FedAvg):
    name = "ditto"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        initial = {n: p.detach().clone() for n, p in self.global_model.named_parameters()}
        self.personal_models: list[dict[str, torch.Tensor] | None] = [None] * len(self.clients)
        self._initial = initial

    def client_round(self, client: int, round_index: int) -> ClientResult:
        received, _ = self.received_model(client)
        reference = [p.detach().clone() for p in received.parameters()]
        result = super().client_round(client, round_index)  # the global model's local update (FedAvg)
        personal = self.model_fn()
        state = self.personal_models[client] or self._initial
        with torch.no_grad():
            for name, p in personal.named_parameters():
                p.copy_(state[name])
        lam = self.config.ditto_lambda
        params = list(personal.parameters())

        def proximal() -> torch.Tensor:
            return 0.5 * lam * sum(((p - r) ** 2).sum() for p, r in zip(params, reference))

        loss, seen, _ = self.local_train(personal, client, round_index, self.learning_rate(round_index),
                                         extra_loss=proximal, purpose=FINETUNE)
        self.personal_models[client] = {n: p.detach().clone() for n, p in personal.named_parameters()}
        result.flops += float(seen * training_flops_per_sample(personal, self.input_shape))
        result.extra["personal_loss"] = loss
        return result

    def personal_model(self, client: int) -> nn.Module:
        model = copy.deepcopy(self.global_model)
        state = self.personal_models[client] or self._initial  # v_k starts at w^0, as in Ditto
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
        return model

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ditto": [None if s is None else {n: t.clone() for n, t in s.items()}
                                                  for s in self.personal_models]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.personal_models = [None if s is None else {n: t.clone() for n, t in s.items()} for s in state["ditto"]]
