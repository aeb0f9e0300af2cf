"""Sub-FedAvg (unstructured): Vahidian, Morafah, Lin, "Personalized Federated Learning by Structured and
Unstructured Pruning under Data Heterogeneity", ICDCS Workshops 2021 (arXiv:2105.00562).

Every client starts dense and, after each local update, prunes ``fedspa.prune_rate`` of its remaining weights per
layer by magnitude (no regrowth) until the layer reaches its target density (``fedspa.density`` spread over the
layers like FedSpa's, ERK by default). The server averages every weight over the clients whose masks hold it, and
client k is evaluated with the global model times its mask — the same machinery as FedSpa (sparse payloads, sparse
layers once a mask is sparse). Simplification: the paper prunes only while the client's validation accuracy
exceeds a threshold; here pruning follows the fixed schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fedspa import FedSpa


class SubFedAvg(FedSpa):
    name = "sub_fedavg"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.masks = [{n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()} for _ in self.clients]
        self.target_nnz = {n: max(1, round(self.densities[n] * math.prod(s))) for n, s in self.shapes.items()}

    def update_masks(self, client: int, model: nn.Module, weights: dict[str, torch.Tensor],
                     round_index: int) -> tuple[dict[str, torch.Tensor], int, float]:
        masks = self.masks[client]
        rate = self.config.fedspa.prune_rate
        new_masks = {}
        for name, mask in masks.items():
            nnz = int(mask.sum())
            drop = min(int(round(rate * nnz)), nnz - self.target_nnz[name])
            if drop <= 0:
                new_masks[name] = mask
                continue
            flat_mask = mask.reshape(-1)
            magnitude = weights[name].abs().reshape(-1).masked_fill(~flat_mask, float("inf"))
            keep = flat_mask.clone()
            keep[torch.topk(magnitude, drop, largest=False, sorted=False).indices] = False
            new_masks[name] = keep.reshape(mask.shape)
            weights[name] = weights[name] * new_masks[name]
        return new_masks, 0, 0.0
