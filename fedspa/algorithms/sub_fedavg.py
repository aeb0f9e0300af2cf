"""Sub-FedAvg (unstructured): Vahidian, Morafah, Lin, "Personalized Federated Learning by Structured and
Unstructured Pruning under Data Heterogeneity", ICDCS Workshops 2021 (arXiv:2105.00562).

Every client starts dense and, after each local update, prunes ``sub_fedavg.prune_rate`` of its remaining weights
per tensor by magnitude (no regrowth) until the tensor reaches its target density (``fedspa.density`` spread over
the tensors like FedSpa's, ERK by default). The server averages every weight over the clients whose masks hold it,
and client k is evaluated with the global model times its mask — FedSpa's machinery (sparse payloads, sparse layers
once a mask is sparse, ``fedspa.execution``). Simplification: the paper prunes only while the client's validation
accuracy exceeds a threshold; here pruning follows the fixed schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .fedspa import EXECUTIONS, FedSpaClient, FedSpaServer, sparse_summary
from .registry import register


@dataclass
class SubFedAvgConfig:
    prune_rate: float = 0.05  # fraction of the remaining weights pruned per round until the target density

    def validate(self) -> None:
        if not 0.0 <= self.prune_rate < 1.0:
            raise ValueError(f"prune_rate must lie in [0, 1), got {self.prune_rate}")


def pruned_nnz(nnz: int, target: int, rate: float) -> int:
    """The nnz after one pruning step: round(rate * nnz) fewer, never below the target."""
    drop = min(int(round(rate * nnz)), nnz - target)
    return nnz - drop if drop > 0 else nnz


class SubFedAvgNnz:
    def nnz_range(self, name: str) -> tuple[int, int]:
        # masks start dense and are pruned towards the target, never below it
        return self.targets[name], math.prod(self.mask_shapes[name])


class SubFedAvgServer(SubFedAvgNnz, FedSpaServer):
    def initial_masks(self, client: int) -> dict[str, torch.Tensor]:
        return {n: torch.ones(s, dtype=torch.bool, device=self.device) for n, s in self.mask_shapes.items()}

    def expected_nnz(self, client: int, name: str) -> int:
        return pruned_nnz(super().expected_nnz(client, name), self.targets[name], self.config.sub_fedavg.prune_rate)

    def check_new_mask(self, client: int, name: str, mask: torch.Tensor) -> None:
        if bool((mask & ~self.masks[client][name]).any()):
            raise ValueError(f"{name}: Sub-FedAvg only prunes, but the new mask holds positions the old one did not")


class SubFedAvgClient(SubFedAvgNnz, FedSpaClient):
    def update_masks(self, model: nn.Module, weights: dict[str, torch.Tensor],
                     round_index: int) -> tuple[dict[str, torch.Tensor], float]:
        rate = self.config.sub_fedavg.prune_rate
        new_masks = {}
        for name, mask in self.mask.items():
            nnz = int(mask.count_nonzero())
            drop = nnz - pruned_nnz(nnz, self.targets[name], rate)
            if drop <= 0:
                new_masks[name] = mask
                continue
            flat_mask = mask.reshape(-1)
            magnitude = weights[name].abs().reshape(-1).masked_fill(~flat_mask, float("inf"))
            keep = flat_mask.clone()
            keep[torch.topk(magnitude, drop, largest=False, sorted=False).indices] = False
            new_masks[name] = keep.reshape(mask.shape)
        return new_masks, 0.0


register("sub_fedavg", server=SubFedAvgServer, client=SubFedAvgClient, config=SubFedAvgConfig, uses=("fedspa",),
         executions=EXECUTIONS, summary=sparse_summary)
