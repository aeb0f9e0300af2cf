"""FedDST: Bibikar, Vikalo, Wang, Chen, "Federated Dynamic Sparse Training: Computing Less, Communicating Less,
Yet Learning Better", AAAI 2022 (arXiv:2112.09824). The sparse FL peer with one global mask.

  1. The server keeps one global model and one global mask (random, ERK densities at ``fedspa.density``, as
     FedSpa's). Every sampled client trains the global values at the global mask (sparse payloads, sparse layers:
     FedSpa's machinery and ``fedspa.execution``).
  2. Every ``feddst.readjust_interval`` rounds (rounds 1, 1 + R, 1 + 2R, ... counted from 0) each sampled client
     readjusts its mask in the middle of local training: it drops round(alpha_t * nnz) active weights of smallest
     |w| per tensor and regrows as many by |gradient| of one minibatch, at 0 (alpha_t: FedSpa's cosine schedule
     from ``fedspa.drop_fraction``), then trains the rest of its steps under the new mask: before the last epoch
     with ``local_epochs >= 2`` (the authors' code readjusts after epoch 9 of 10), after half of the steps
     otherwise. A fresh SGD momentum starts after the readjustment.
  3. It uploads its values at its mask. The server averages each position over the clients that hold it,
     weighted by their samples (dense entries: the weighted mean); the new global mask is the union of the
     uploaded masks, magnitude-pruned per tensor back to the target count; weights outside it are set to 0.
  4. FedDST is not personalized: every client is evaluated with the global model at the global mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import fedspa_kernels as fk

from ..nn import masked_weight_values
from ..schedule import drop_counts, drop_fraction
from .base import READJUST, TrainMetrics, load_state
from .fedspa import EXECUTIONS, FedSpaClient, FedSpaServer, Received, sparse_summary
from .registry import register


@dataclass
class FedDSTConfig:
    readjust_interval: int = 5  # rounds between mask readjustments (R_adj)

    def validate(self) -> None:
        if isinstance(self.readjust_interval, bool) or self.readjust_interval < 1:
            raise ValueError(f"readjust_interval must be an integer >= 1, got {self.readjust_interval!r}")


def readjust_fraction(config, round_index: int) -> float:
    """The fraction of each tensor's active weights the clients readjust in round `round_index` (0 when they
    do not readjust)."""
    interval = config.feddst.readjust_interval
    if round_index < 1 or (round_index - 1) % interval != 0:
        return 0.0
    return drop_fraction(round_index, config.rounds, config.fedspa.drop_fraction)


class FedDSTServer(FedSpaServer):
    def one_mask(self) -> bool:
        return True

    def check_new_mask(self, client: int, name: str, mask: torch.Tensor, round_index: int) -> None:
        if readjust_fraction(self.config, round_index) == 0.0 and not torch.equal(mask, self.masks[client][name]):
            raise ValueError(f"{name}: FedDST clients readjust their masks only in readjustment rounds, round "
                             f"{round_index + 1} is not one")

    def aggregate(self, received: list[Received], round_index: int) -> None:
        if not received:
            return
        state = self.global_model.state_dict()
        sparse = list(self.mask_shapes)
        weights = [float(r.samples) for r in received]
        offsets, total = {}, 0
        for name in sparse:
            offsets[name] = total
            total += state[name].numel()
        new_mask = {}
        with torch.no_grad():
            merged = {}
            if sparse:
                previous = torch.cat([state[n].detach().reshape(-1).float() for n in sparse])
                indices = [torch.cat([r.positions[n] + offsets[n] for n in sparse]) for r in received]
                values = [torch.cat([r.values[n] for n in sparse]) for r in received]
                flat = fk.scatter_add_average(indices, values, previous, weights)
                for name in sparse:
                    union = torch.zeros(state[name].numel(), dtype=torch.bool, device=self.device)
                    for r in received:
                        union[r.positions[name]] = True
                    values_here = flat[offsets[name]:offsets[name] + state[name].numel()]
                    keep = union
                    if int(union.count_nonzero()) > self.targets[name]:  # back to the target: largest |w|
                        magnitude = values_here.abs().masked_fill(~union, -1.0)
                        order = torch.sort(magnitude, descending=True, stable=True).indices
                        keep = torch.zeros_like(union)
                        keep[order[: self.targets[name]]] = True
                    new_mask[name] = keep.reshape(self.mask_shapes[name])
                    merged[name] = torch.where(keep, values_here, torch.zeros_like(values_here))
            merged.update(self.average_dense_entries(received, weights))
            load_state(self.global_model, merged)
        if any(not torch.equal(new_mask[n], self.masks[0][n]) for n in sparse):
            self.masks = [new_mask] * self.num_clients
            self.server_knows_mask = [False] * self.num_clients  # every next downlink carries the new positions
        else:
            for r in received:
                self.server_knows_mask[r.client] = True


class FedDSTClient(FedSpaClient):
    def _steps(self) -> tuple[int, int]:
        """(steps before, steps after) the readjustment of this round's local training."""
        cfg = self.config
        per_epoch = max(1, math.ceil(self.data.num_train / cfg.batch_size))
        total = cfg.local_steps if cfg.local_steps is not None else cfg.local_epochs * per_epoch
        after = per_epoch if cfg.local_steps is None and cfg.local_epochs >= 2 else total // 2
        return total - after, after

    def readjust(self, model: nn.Module, round_index: int, fraction: float) -> tuple[dict[str, torch.Tensor], float]:
        """The readjusted masks (drop smallest |w|, regrow largest |gradient|) and the FLOPs of the gradient."""
        names = list(self.mask_shapes)
        weights = masked_weight_values(model, names)
        scores, flops = self._gradient_scores(model, round_index)
        counts = drop_counts([int(self.mask[n].count_nonzero()) for n in names], [self.mask[n].numel() for n in names],
                             fraction)
        new = fk.prune_regrow([weights[n] for n in names], [self.mask[n] for n in names], [scores[n] for n in names],
                              counts)
        return dict(zip(names, new)), flops

    def round(self, downlink: bytes, round_index: int, *, measure_memory: bool = False) -> tuple[bytes, TrainMetrics]:
        model = self.model_for(downlink, training=True)
        fraction = readjust_fraction(self.config, round_index)
        before, after = self._steps()
        if fraction == 0.0 or not self.mask_shapes or before < 1:
            metrics = self.local_train(model, round_index, measure_memory=measure_memory)
        else:
            metrics = self.local_train(model, round_index, steps=before, measure_memory=measure_memory)
            new_masks, extra_flops = self.measured(lambda: self.readjust(model, round_index, fraction), model,
                                                   metrics, measure_memory)
            dense = self._densified(model)  # the regrown weights are 0 in it: they start there
            self.mask = new_masks
            model = self._execute(dense)
            if after > 0:
                rest = self.local_train(model, round_index, steps=after, purpose=READJUST)
                seen = metrics.samples + rest.samples
                metrics = TrainMetrics((metrics.loss * metrics.samples + rest.loss * rest.samples) / max(seen, 1), seen,
                                       metrics.flops + rest.flops, metrics.peak_memory,
                                       metrics.profiling_seconds + rest.profiling_seconds)
            metrics.flops += extra_flops
        return self.upload(model, masked_weight_values(model, list(self.mask_shapes)), self.mask), metrics


def feddst_summary(config) -> dict:
    return {**sparse_summary(config), "readjust_interval": config.feddst.readjust_interval}


register("feddst", server=FedDSTServer, client=FedDSTClient, config=FedDSTConfig, uses=("fedspa",),
         executions=EXECUTIONS, summary=feddst_summary)
