"""Sub-FedAvg (unstructured): Vahidian, Morafah, Lin, "Personalized Federated Learning by Structured and
Unstructured Pruning under Data Heterogeneity", ICDCS Workshops 2021 (arXiv:2105.00562).

Every client starts dense and, after each local update, prunes weights per tensor by magnitude (no regrowth) until
the tensor reaches its target density (``fedspa.density`` spread over the tensors like FedSpa's, ERK by default).
How much: by default a round schedule that reaches the target by round ``prune_until * rounds`` whatever how
often a client is sampled (a client sampled in round t prunes down to density target ** ((t + 1) /
(prune_until * rounds)) of each tensor); with ``prune_rate`` set, a fixed fraction of the remaining weights per
participation (the paper's rule, which needs about log(density) / log(1 - rate) participations). The server averages every weight over the clients whose masks hold it,
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
    # fraction of the remaining weights pruned per participation; None: the round schedule (reaches the target)
    prune_rate: float | None = None
    prune_until: float = 0.5  # the schedule reaches the target density by this fraction of the rounds

    def validate(self) -> None:
        if self.prune_rate is not None and not 0.0 <= self.prune_rate < 1.0:
            raise ValueError(f"prune_rate must lie in [0, 1) or be null (the round schedule), got {self.prune_rate}")
        if not 0.0 < self.prune_until <= 1.0:
            raise ValueError(f"prune_until must lie in (0, 1], got {self.prune_until}")


def pruned_nnz(nnz: int, target: int, rate: float) -> int:
    """The nnz after one pruning step: round(rate * nnz) fewer, never below the target."""
    drop = min(int(round(rate * nnz)), nnz - target)
    return nnz - drop if drop > 0 else nnz


def scheduled_nnz(nnz: int, numel: int, target: int, round_index: int, rounds: int, until: float) -> int:
    """The nnz after pruning in round `round_index` (0-based) under the round schedule: the density follows
    (target / numel) ** ((t + 1) / (until * rounds)) down to the target, and never grows."""
    if target >= numel:
        return nnz
    progress = min(1.0, (round_index + 1) / max(1.0, until * rounds))
    wanted = math.ceil(numel * (target / numel) ** progress)
    return max(target, min(nnz, wanted))


class SubFedAvgNnz:
    def nnz_range(self, name: str) -> tuple[int, int]:
        # masks start dense and are pruned towards the target, never below it
        return self.targets[name], math.prod(self.mask_shapes[name])

    def next_nnz(self, nnz: int, name: str, round_index: int) -> int:
        """How many weights of tensor `name` a mask of `nnz` keeps after the pruning of round `round_index`."""
        cfg = self.config.sub_fedavg
        if cfg.prune_rate is not None:
            return pruned_nnz(nnz, self.targets[name], cfg.prune_rate)
        return scheduled_nnz(nnz, math.prod(self.mask_shapes[name]), self.targets[name], round_index,
                             self.config.rounds, cfg.prune_until)


class SubFedAvgServer(SubFedAvgNnz, FedSpaServer):
    def one_mask(self) -> bool:
        if self.config.fedspa.mask_scope == "shared":
            raise ValueError("fedspa.mask_scope=shared is FedSpa's ablation; sub_fedavg keeps a mask per client")
        return False

    def initial_masks(self, client: int) -> dict[str, torch.Tensor]:
        return {n: torch.ones(s, dtype=torch.bool, device=self.device) for n, s in self.mask_shapes.items()}

    def expected_nnz(self, client: int, name: str, round_index: int) -> int:
        return self.next_nnz(super().expected_nnz(client, name, round_index), name, round_index)

    def check_new_mask(self, client: int, name: str, mask: torch.Tensor, round_index: int) -> None:
        if bool((mask & ~self.masks[client][name]).any()):
            raise ValueError(f"{name}: Sub-FedAvg only prunes, but the new mask holds positions the old one did not")


class SubFedAvgClient(SubFedAvgNnz, FedSpaClient):
    def update_masks(self, model: nn.Module, weights: dict[str, torch.Tensor],
                     round_index: int) -> tuple[dict[str, torch.Tensor], float]:
        new_masks = {}
        for name, mask in self.mask.items():
            nnz = int(mask.count_nonzero())
            drop = nnz - self.next_nnz(nnz, name, round_index)
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
