"""FedSpa: personalized sparse masks, sparse-to-sparse local training, mask evolution, sparse aggregation.

Huang, Liu, Shen, He, Lin, Tao, "Achieving Personalized Federated Learning with Sparse Local Models",
arXiv:2201.11380 (2022); where the paper is silent the defaults follow the same group's DisPFL code (ICML 2022):

  1. The server keeps a dense global model and every client's mask (random, ERK densities, per client seed). It
     sends each sampled client only the global values at the client's mask (the positions too until the server
     has accepted an upload carrying them), plus the dense entries (biases, normalization parameters and
     statistics) whole.
  2. The client trains only its active weights: weights that a sparse layer supports (``nn.Linear``, ``nn.Conv2d``
     with groups = 1) run on SparseLinear/SparseConv2d (``fedspa.execution = sparse``, for layers at most
     ``fedspa.sparse_max_density`` dense); every other masked weight (a depthwise conv, an Embedding,
     ``MultiheadAttention``'s packed projection, denser layers) runs as the dense weight times its mask.
     ``dense_masked`` runs every masked weight that way, as most FL code does, to measure what the sparse path
     saves.
  3. After local training the client updates its mask (every ``mask_update_interval`` rounds): each tensor drops
     round(alpha_t * nnz) active weights of smallest |w| and regrows as many inactive positions, by |gradient| of
     one dense minibatch (default, as RigL; chosen on a validation split) or a random score (the paper's);
     alpha_t anneals with a cosine. One fedspa_kernels.prune_regrow call covers every tensor.
  4. The client uploads its values at its new mask with the mask (bitmap or int32 positions, the smaller). The
     server knows the mask the client trained under (it sent it), so a client *holds* only the positions it
     trained and kept; the regrown ones carry no trained value and never enter the aggregate. They start the
     client's next round at the global value it fetches (``regrown_init = global``, the default) or at 0
     (``zero``, as in RigL).
  5. The server aggregates with one fedspa_kernels scatter-add call over all sampled clients and all masked
     tensors: ``holders`` (default) averages each position over the clients holding it and keeps the previous
     value where nobody does; ``mean`` adds the average of the held sparse updates m_k * (w_k - w). Dense entries
     are averaged.
  6. Client k's personal model is the global model times its mask (with its own normalization layers under
     ``norm_layers = local``, and its own dense head under ``fedspa.personal_head``: the last Linear layer is then
     neither masked nor sent, as in FedPer).
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fedspa_kernels as fk

from .. import comm
from ..config import ExperimentConfig
from ..execution import fastest_sparse, layer_inputs
from ..masks import client_generator, layer_densities, maskable_parameters, random_masks, target_nnz
from ..metrics import flop_counter_mode, peak_step_memory
from ..nn import (apply_masks, dense_weight_gradients, masked_weight_values, set_masked_weights, sparse_layer_for,
                  training_memory_bytes, why_not_sparse)
from ..schedule import drop_counts, drop_fraction
from .base import (INIT, REGROW, Client, Server, TrainMetrics, Upload, check_tensors, last_linear_names,
                   load_state)
from .registry import register

log = logging.getLogger("fedspa")

MASK_INITS = ("erk", "uniform")
REGROWTHS = ("random", "gradient")
AGGREGATIONS = ("holders", "mean")
REGROWN_INITS = ("zero", "global")
MASK_SCOPES = ("personal", "shared")
EXECUTIONS = ("sparse", "dense_masked")
SPARSE_POLICIES = ("fastest", "memory")


@dataclass
class FedSpaConfig:
    """The sparse-training settings (FedSpa's, also read by Sub-FedAvg)."""

    density: float = 0.5  # overall density of the masked weights (the paper's)
    mask_init: str = "erk"
    drop_fraction: float = 0.5  # alpha_0 of the cosine schedule
    mask_update_interval: int = 1  # rounds between mask updates
    regrowth: str = "random"  # random (the paper's) and global: chosen on a validation split (docs/training.md)
    regrown_init: str = "global"
    aggregation: str = "holders"
    weighted_aggregation: bool = False  # weight clients by their data size
    personal_head: bool = False  # the last Linear layer stays dense on each client, never sent (FedPer's lever)
    # shared: one mask for every client, updated at the server (an ablation: is it the personal mask that helps?)
    mask_scope: str = "personal"
    execution: str = "sparse"  # dense_masked: dense weights x mask, the comparison most FL code runs
    # sparse execution, which layers run sparse: fastest = the faster way, measured per layer case and cached
    # (fedspa.execution); memory = every layer at most sparse_max_density dense (the leanest, not always faster)
    sparse_policy: str = "fastest"
    sparse_max_density: float = 0.5  # the memory policy's threshold

    def validate(self) -> None:
        for name, value, allowed in (("mask_init", self.mask_init, MASK_INITS), ("regrowth", self.regrowth, REGROWTHS),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("regrown_init", self.regrown_init, REGROWN_INITS),
                                     ("mask_scope", self.mask_scope, MASK_SCOPES),
                                     ("execution", self.execution, EXECUTIONS),
                                     ("sparse_policy", self.sparse_policy, SPARSE_POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {self.density}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must lie in [0, 1], got {self.drop_fraction}")
        if not 0.0 <= self.sparse_max_density <= 1.0:
            raise ValueError(f"sparse_max_density must lie in [0, 1], got {self.sparse_max_density}")
        if self.mask_scope == "shared" and self.regrowth != "random":
            raise ValueError("regrowth must be random with mask_scope=shared: the one mask is updated at the server, "
                             f"which has no gradients; got {self.regrowth!r}")
        if isinstance(self.mask_update_interval, bool) or self.mask_update_interval < 1:
            raise ValueError(f"mask_update_interval must be an integer >= 1, got {self.mask_update_interval!r}")


class SparseLayout:
    """What both halves agree on: the masked tensors, their densities, the entries that travel, in order."""

    def _init_layout(self) -> None:
        cfg = self.config.fedspa
        personal = self.models.norm_entries() if self.config.norm_layers == "local" else set()
        if cfg.personal_head:
            personal |= last_linear_names(self.models.template)
        self.mask_shapes = {n: s for n, s in maskable_parameters(self.models.template).items() if n not in personal}
        self.densities = layer_densities(self.mask_shapes, cfg.density, cfg.mask_init)
        self.wire_names = [n for n in self.models.names if n not in personal]  # what travels, in order
        self.personal_names = [n for n in self.models.names if n in personal]
        self.targets = target_nnz(self.mask_shapes, self.densities)

    def nnz_range(self, name: str) -> tuple[int, int]:
        """The least and most active weights a mask of tensor `name` may hold (FedSpa: exactly its target)."""
        return self.targets[name], self.targets[name]

    def check_masks(self, what: str, masks: object) -> None:
        """Raises ValueError unless `masks` is one bool mask per masked tensor, each with an allowed nnz."""
        check_tensors(what, masks, self.mask_shapes, dtype=torch.bool)
        for name, mask in masks.items():
            low, high = self.nnz_range(name)
            nnz = int(mask.count_nonzero())
            if not low <= nnz <= high:
                allowed = f"{low}" if low == high else f"between {low} and {high}"
                raise ValueError(f"{what} {name} has {nnz} active weights, it must have {allowed}")


@dataclass
class Received:
    """A checked FedSpa upload: per travelling entry its values (and positions, for masked tensors)."""

    client: int
    samples: int
    values: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


class FedSpaServer(SparseLayout, Server):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_layout()
        self.shared = self.one_mask()
        self.masks = [self.initial_masks(k) for k in range(self.num_clients)]
        self.server_knows_mask = [False] * self.num_clients  # until then every downlink carries the positions
        self._mask_nnz: dict[int, tuple[dict, int]] = {}  # id -> (masks, nnz); holding masks keeps the id unique

    def initial_masks(self, client: int) -> dict[str, torch.Tensor]:
        return random_masks(self.mask_shapes, self.densities,
                            client_generator(self.config.seed, -1 if self.shared else client, INIT), self.device)

    def one_mask(self) -> bool:
        """Do all clients train under one mask? (FedSpa: with ``fedspa.mask_scope = shared``.)"""
        return self.config.fedspa.mask_scope == "shared"

    # ---------------------------------------------------------------------------------------------- protocol
    def downlink(self, client: int, round_index: int) -> bytes:
        state = self.global_model.state_dict()
        masks = self.masks[client]
        return comm.encode([(state[n], masks[n], self.server_knows_mask[client]) if n in masks
                            else (state[n], None, False) for n in self.wire_names])

    def expected_nnz(self, client: int, name: str, round_index: int) -> int:
        """The number of active weights client `client` must upload for tensor `name` in round `round_index`
        (FedSpa: unchanged)."""
        return int(self.masks[client][name].count_nonzero())

    def check_new_mask(self, client: int, name: str, mask: torch.Tensor, round_index: int) -> None:
        """Further rules a client's new mask must follow (shared masks: unchanged; Sub-FedAvg: only pruning)."""
        if self.shared and not torch.equal(mask, self.masks[client][name]):
            raise ValueError(f"{name}: with shared masks a client uploads at the mask it was sent, this one differs")

    def receive(self, upload: Upload) -> Received:
        k = upload.client
        if not 0 <= k < self.num_clients:
            raise ValueError(f"client {k} is not part of this federation of {self.num_clients}")
        if upload.round_index is None:
            raise ValueError("a FedSpa upload must say the round it was trained in (Upload.round_index)")
        expect = [comm.Expect.sparse(math.prod(self.models.shapes[n]), self.expected_nnz(k, n, upload.round_index))
                  if n in self.mask_shapes else comm.Expect.dense(math.prod(self.models.shapes[n]))
                  for n in self.wire_names]
        entries = comm.decode(upload.payload, expect=expect)  # every header, range, order and value checked
        values, positions, masks = {}, {}, {}
        for name, entry in zip(self.wire_names, entries):
            if name in self.mask_shapes:
                position = entry.positions.to(self.device)
                mask = torch.zeros(entry.numel, dtype=torch.bool, device=self.device)
                mask[position] = True
                mask = mask.reshape(self.mask_shapes[name])
                self.check_new_mask(k, name, mask, upload.round_index)
                positions[name], masks[name] = position, mask
            values[name] = entry.values.to(self.device)
        return Received(k, upload.metrics.samples, values, positions, masks)

    def aggregate(self, received: list[Received], round_index: int) -> None:
        if not received:
            return
        cfg = self.config.fedspa
        state = self.global_model.state_dict()
        sparse = list(self.mask_shapes)
        offsets, total = {}, 0
        for name in sparse:
            offsets[name] = total
            total += state[name].numel()
        with torch.no_grad():
            previous = torch.cat([state[n].detach().reshape(-1).float() for n in sparse]) if sparse else None
            indices, values = [], []
            for r in received:
                if sparse:
                    # a client holds what it trained (the mask the server sent it) and kept; the positions it
                    # regrew carry no trained value and must not count as holders
                    held = [self.masks[r.client][n].reshape(-1)[r.positions[n]] for n in sparse]
                    indices.append(torch.cat([r.positions[n][h] + offsets[n] for n, h in zip(sparse, held)]))
                    values.append(torch.cat([r.values[n][h] for n, h in zip(sparse, held)]))
            weights = [float(r.samples) for r in received] if cfg.weighted_aggregation else None
            merged = {}
            if sparse:
                if cfg.aggregation == "holders":
                    flat = fk.scatter_add_average(indices, values, previous, weights)
                else:  # mean of the sparse updates: w + (1/S) sum_k m_k (w_k - w)
                    deltas = [v - previous[i] for i, v in zip(indices, values)]
                    scale = [1.0 / len(received)] * len(received)
                    step, _ = fk.scatter_add_aggregate(indices, deltas, previous.numel(), scale)
                    flat = previous + step
                merged = {n: flat[offsets[n]:offsets[n] + state[n].numel()] for n in sparse}
            merged.update(self.average_dense_entries(
                received, [float(r.samples) if cfg.weighted_aggregation else 1.0 for r in received]))
            load_state(self.global_model, merged)
        for r in received:
            self.masks[r.client] = r.masks
            self.server_knows_mask[r.client] = True
        if self.shared:
            self.update_shared_mask(round_index)

    def average_dense_entries(self, received: list[Received], weights: list[float]) -> dict[str, torch.Tensor]:
        """The weighted mean over the uploads of every travelling entry that has no mask (biases, norms)."""
        share = torch.tensor(weights, dtype=torch.float32, device=self.device)
        out = {}
        for name in self.wire_names:
            if name in self.mask_shapes:
                continue
            stacked = torch.stack([r.values[name] for r in received])
            out[name] = (stacked * share.reshape(-1, *([1] * (stacked.dim() - 1)))).sum(0) / share.sum()
        return out

    def update_shared_mask(self, round_index: int) -> None:
        """mask_scope = shared: the one mask drops the smallest |w| of the aggregated model and regrows as many
        positions at random (FedSpa's schedule), for every client; regrown weights start at 0 with
        regrown_init = zero. Every client is sent the new positions with its next downlink."""
        cfg = self.config
        names = list(self.mask_shapes)
        interval = cfg.fedspa.mask_update_interval
        fraction = drop_fraction(round_index, cfg.rounds, cfg.fedspa.drop_fraction) \
            if round_index % interval == 0 else 0.0
        if fraction <= 0 or not names:
            return
        mask = self.masks[0]
        state = self.global_model.state_dict()
        generator = client_generator(cfg.seed, -1, REGROW, round_index)
        scores = [torch.rand(self.mask_shapes[n], generator=generator, device="cpu").to(self.device) for n in names]
        counts = drop_counts([int(mask[n].count_nonzero()) for n in names], [mask[n].numel() for n in names],
                             fraction)
        with torch.no_grad():
            weights = [state[n].detach().float() * mask[n] for n in names]
            new = dict(zip(names, fk.prune_regrow(weights, [mask[n] for n in names], scores, counts)))
            if cfg.fedspa.regrown_init == "zero":
                load_state(self.global_model, {n: torch.where(new[n] & ~mask[n], torch.zeros_like(state[n]), state[n])
                                               for n in names})
        self.masks = [new] * self.num_clients
        self.server_knows_mask = [False] * self.num_clients

    def round_metrics(self) -> dict[str, float]:
        total = sum(math.prod(s) for s in self.mask_shapes.values())
        if not total:
            return {}
        # each mask dict is counted once: masks are replaced, never changed in place, so only the new ones are
        counted = self._mask_nnz
        for masks in self.masks:
            if id(masks) not in counted:
                counted[id(masks)] = (masks, sum(int(m.count_nonzero()) for m in masks.values()))
        self._mask_nnz = {id(masks): counted[id(masks)] for masks in self.masks}
        return {"mask_density": sum(self._mask_nnz[id(masks)][1] for masks in self.masks) / (total * len(self.masks))}

    def drop(self, client: int) -> None:
        # the client may hold a mask the server never accepted: the next downlink carries the positions again
        self.server_knows_mask[client] = False

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": [{n: m.clone() for n, m in masks.items()} for masks in self.masks],
                "server_knows_mask": list(self.server_knows_mask)}

    extra_state_keys = ("masks", "server_knows_mask")

    def load_state_dict(self, state: dict) -> None:
        for key, length in (("masks", self.num_clients), ("server_knows_mask", self.num_clients)):
            if not isinstance(state.get(key), list) or len(state[key]) != length:
                raise ValueError(f"server state {key} must be a list of {length} entries (one per client)")
        for k, masks in enumerate(state["masks"]):
            self.check_masks(f"server state masks[{k}]", masks)
        if not all(isinstance(v, bool) for v in state["server_knows_mask"]):
            raise ValueError("server state server_knows_mask must hold booleans")
        if self.shared and any(not torch.equal(masks[n], state["masks"][0][n]) for masks in state["masks"]
                               for n in self.mask_shapes):
            raise ValueError("server state masks: with fedspa.mask_scope=shared every client's mask is the same")
        super().load_state_dict(state)
        self.masks = [{n: m.to(self.device) for n, m in masks.items()} for masks in state["masks"]]
        self.server_knows_mask = list(state["server_knows_mask"])


class FedSpaClient(SparseLayout, Client):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_layout()
        self.mask: dict[str, torch.Tensor] | None = None  # learnt from the first downlink
        # the positions the last mask update regrew (regrown_init = zero starts them at 0 in the next round)
        self.regrown: dict[str, torch.Tensor] | None = None
        self.personal = {n: t.to(self.device) for n, t in self.models.initial_state(self.personal_names).items()}
        self._sparse_runs: bool | None = None  # does this model run with sparse layers? (probed once)
        self._layer_inputs: dict[str, tuple[tuple[int, ...], bool]] | None = None  # for the fastest policy
        self._sparse_evaluates: bool | None = None  # does it also run with sparse layers in eval mode? (probed once)
        # the prepared model kept between uses: (model, the masks it runs at, its plan key); see model_for
        self._executed: tuple[nn.Module, dict[str, torch.Tensor], tuple[int, ...]] | None = None

    # ---------------------------------------------------------------------------------------------- pieces
    def _decode(self, downlink: bytes, training: bool) -> dict[str, torch.Tensor]:
        """The server's values of every travelling entry (a masked tensor's: its values at this client's mask, in the
        mask's row-major order, on the client's device); adopts the mask when the server sent positions. With
        `training` and ``regrown_init = zero``, the weights the last mask update regrew start at 0 (when the server
        sent values at the mask the client uploaded)."""
        known = None
        if self.mask is not None:
            known = [self.mask[n].reshape(-1).nonzero().squeeze(1).cpu() if n in self.mask_shapes else None
                     for n in self.wire_names]
        expect = [comm.Expect(math.prod(self.models.shapes[n]), comm.SPARSE | {comm.VALUES}) if n in self.mask_shapes
                  else comm.Expect.dense(math.prod(self.models.shapes[n])) for n in self.wire_names]
        entries = comm.decode(downlink, known, expect=expect)
        values, mask, resent = {}, self.mask, False
        for name, entry in zip(self.wire_names, entries):
            if name not in self.mask_shapes:
                values[name] = entry.values
                continue
            value = entry.values.to(self.device, self.models.dtypes[name])
            if entry.kind != comm.VALUES:  # the server tells us our mask
                resent = True
                flat_mask = torch.zeros(math.prod(self.mask_shapes[name]), dtype=torch.bool, device=self.device)
                flat_mask[entry.positions.to(self.device)] = True
                sent = flat_mask.reshape(self.mask_shapes[name])
                if mask is None or name not in mask or not torch.equal(sent, mask[name]):
                    mask = {**(mask or {}), name: sent}  # a new dict: masks are replaced, never changed in place
            elif training and self.regrown is not None and self.config.fedspa.regrown_init == "zero":
                value = value.masked_fill(self.regrown[name].reshape(-1)[entry.positions.to(self.device)], 0)
            values[name] = value
        if training or resent:
            self.regrown = None  # used once; a mask the server resent is not the one the update regrew in
        self.mask = mask
        return values

    def _dense_model(self, values: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh dense model holding `values` (masked tensors zero off this client's mask) and the personal
        entries."""
        model = self.models.make(self.device)
        state = model.state_dict()
        dense = {}
        for name, value in values.items():
            if name in self.mask_shapes:
                flat = torch.zeros(state[name].numel(), dtype=state[name].dtype, device=self.device)
                flat[self.mask[name].reshape(-1)] = value
                dense[name] = flat
            else:
                dense[name] = value
        load_state(model, dense)
        load_state(model, self.personal)
        return model

    def received_model(self, downlink: bytes, *, training: bool = False) -> nn.Module:
        """The dense model the server sent: the global values at this client's mask, zeros elsewhere (``_decode``)."""
        return self._dense_model(self._decode(downlink, training))

    def model_for(self, downlink: bytes, *, training: bool = False) -> nn.Module:
        """The model this client trains (or evaluates) from the server's payload, ready to run at its mask (sparse
        layers where they pay, dense weights x mask elsewhere: ``_execute``).

        The prepared model is kept between uses, within a process-wide budget (``fedspa.algorithms.fedspa.
        MODEL_CACHE``): a new payload only rewrites its values in place, and a new mask rebuilds only the patterns
        of the weights whose mask changed. It is built afresh only when the layer plan may change (another number of
        active weights in some tensor) or after it was evicted.
        """
        values = self._decode(downlink, training)
        key = self._plan_key()
        if self._executed is not None and self._executed[2] == key:
            model, masks, _ = self._executed
            moved = [n for n in self.mask_shapes
                     if self.mask[n] is not masks[n] and not torch.equal(self.mask[n], masks[n])]
            set_masked_weights(model, self.mask, {n: values[n] for n in self.mask_shapes}, moved)
            load_state(model, {n: v for n, v in values.items() if n not in self.mask_shapes})
            load_state(model, self.personal)
            model.zero_grad(set_to_none=True)
        else:
            model = self._execute(self._dense_model(values))
        self._executed = (model, self.mask, key)
        MODEL_CACHE.hold(self, training_memory_bytes(model)["total"])
        return model

    def _plan_key(self) -> tuple[int, ...]:
        """What the layer plan depends on besides fixed settings: the number of active weights per masked tensor."""
        return tuple(int(self.mask[n].count_nonzero()) for n in self.mask_shapes)

    def forget_model(self) -> None:
        """Drops the prepared model (the next use builds it again)."""
        self._executed = None

    def _densified(self, model: nn.Module) -> nn.Module:
        """A plain dense copy of `model` however it runs (masked weights zero off the mask, everything else as is)."""
        dense = self.models.make(self.device)
        weights = masked_weight_values(model, list(self.mask_shapes))
        state = model.state_dict()
        load_state(dense, {**{n: state[n] for n in self.models.names if n not in weights}, **weights})
        return dense

    def _fastest(self, model: nn.Module) -> set[str]:
        """The masked weights measured faster as sparse layers than as dense weights x mask (fedspa.execution)."""
        if self._layer_inputs is None:  # the activation shapes do not change between rounds: probed once
            names = [n.rpartition(".")[0] for n in self.mask_shapes]
            self._layer_inputs = layer_inputs(model, names, self.data.train_x[: self.config.batch_size])
        timings = fastest_sparse(model, self.mask, self.data.train_x[:1], inputs=self._layer_inputs)
        _log_once("fedspa: layer execution measured (sparse vs dense x mask, ms per training step): " + ", ".join(
            f"{n} {t.choice} ({t.sparse_ms:.3g} vs {t.masked_ms:.3g})" for n, t in timings.items()), logging.INFO)
        return {n for n, t in timings.items() if t.choice == "sparse"}

    def _execute(self, model: nn.Module) -> nn.Module:
        """`model` made ready to train at this client's mask, in place: sparse layers where they pay and work,
        dense weights x mask for the other masked weights."""
        cfg = self.config.fedspa
        sparse = cfg.execution == "sparse" and self._sparse_runs is not False
        chosen = self._fastest(model) if sparse and cfg.sparse_policy == "fastest" else None
        plan = apply_masks(model, self.mask, sparse=sparse, sparse_max_density=cfg.sparse_max_density,
                           sparse_names=chosen)
        if sparse and self._sparse_runs is None and "sparse" in plan.values():
            self._sparse_runs = self._probe(model)
            if not self._sparse_runs:
                model = self._densified(model)
                plan = apply_masks(model, self.mask, sparse=False)
        if cfg.execution == "sparse":
            _report_masked_without_kernel(self.models.template, plan, self.mask, cfg.sparse_max_density)
        return model

    def _probe(self, model: nn.Module) -> bool:
        """One forward/backward of two samples on a copy: False (logged once) when the model's code does not work
        with sparse layers (e.g. a module that reads a child Linear's ``.weight`` tensor itself)."""
        x, y = self.data.train_x[:2], self.data.train_y[:2]
        try:
            self.loss_fn(copy.deepcopy(model).train()(x), y).backward()
            return True
        except Exception as exc:  # noqa: BLE001  (whatever the user's model raises)
            dense = self._densified(model)
            apply_masks(dense, self.mask, sparse=False)
            self.loss_fn(dense(x), y).backward()  # a model that fails dense too: its own error surfaces here
            _log_once(f"fedspa: {type(self.models.template).__name__} does not run with sparse layers "
                      f"({type(exc).__name__}: {exc}); every masked weight runs as dense weights x mask")
            return False

    def _gradient_scores(self, model: nn.Module, round_index: int) -> tuple[dict[str, torch.Tensor], float]:
        """|dense gradient| of one minibatch at the current (masked) weights: RigL's regrowth score, and the FLOPs it
        took. Computed on the model as it runs (``fedspa.nn.dense_weight_gradients``: its sparse forward and backward,
        each masked layer's dense weight gradient formed from its input and output gradient), so no dense copy of
        the model is made; a model with masked weights of other kinds (e.g. an Embedding) gets a dense copy."""
        data = self.data
        order = torch.randperm(data.num_train, device="cpu",
                               generator=client_generator(self.config.seed, self.client_id, REGROW, round_index))
        batch = order[: self.config.batch_size].to(self.device)
        x, y = data.train_x[batch], data.train_y[batch]
        with flop_counter_mode() as counter:
            grads = dense_weight_gradients(model, list(self.mask_shapes), lambda: self.loss_fn(model(x), y))
        if grads is not None:
            return {n: g.abs().reshape(self.mask_shapes[n]) for n, g in grads.items()}, float(counter.get_total_flops())
        dense = self._densified(model)
        dense.zero_grad(set_to_none=True)
        with flop_counter_mode() as counter:
            logits = dense(x)
        self.loss_fn(logits, y).backward()
        params = dict(dense.named_parameters())
        return {n: params[n].grad.abs() for n in self.mask_shapes}, 3.0 * counter.get_total_flops()

    def measured(self, step: Callable[[], Any], model: nn.Module, metrics: TrainMetrics, measure: bool) -> Any:
        """`step()`'s result; with `measure`, its peak memory (the trained model held, plus what the step
        allocates, e.g. the dense copy and gradient of |gradient| regrowth) raises ``metrics.peak_memory`` where it
        is higher, and its time counts as profiling (not training)."""
        if not measure or metrics.peak_memory is None:
            return step()
        holder = {}
        began = time.perf_counter()
        peak = peak_step_memory(lambda: holder.setdefault("result", step()), training_memory_bytes(model)["total"],
                                self.device)
        metrics.profiling_seconds += time.perf_counter() - began
        metrics.peak_memory = max(metrics.peak_memory, peak)
        return holder["result"]

    def update_masks(self, model: nn.Module, weights: dict[str, torch.Tensor],
                     round_index: int) -> tuple[dict[str, torch.Tensor], float]:
        """FedSpa's mask update after local training (prune smallest |w|, regrow as many, cosine-annealed count).
        Returns the new masks and the extra training FLOPs it cost."""
        cfg = self.config
        masks = self.mask
        if cfg.fedspa.mask_scope == "shared":  # the server updates the one mask
            return masks, 0.0
        interval = cfg.fedspa.mask_update_interval
        fraction = drop_fraction(round_index, cfg.rounds, cfg.fedspa.drop_fraction) if round_index % interval == 0 \
            else 0.0
        names = list(self.mask_shapes)
        if fraction <= 0 or not names:
            return masks, 0.0
        extra_flops = 0.0
        if cfg.fedspa.regrowth == "gradient":
            scores, extra_flops = self._gradient_scores(model, round_index)
        else:
            generator = client_generator(cfg.seed, self.client_id, REGROW, round_index)
            scores = {n: torch.rand(self.mask_shapes[n], generator=generator, device="cpu").to(self.device)
                      for n in names}
        counts = drop_counts([int(masks[n].count_nonzero()) for n in names], [masks[n].numel() for n in names],
                             fraction)
        new = fk.prune_regrow([weights[n] for n in names], [masks[n] for n in names], [scores[n] for n in names],
                              counts)
        return dict(zip(names, new)), extra_flops

    # ---------------------------------------------------------------------------------------------- protocol
    def round(self, downlink: bytes, round_index: int, *, measure_memory: bool = False) -> tuple[bytes, TrainMetrics]:
        model = self.model_for(downlink, training=True)
        metrics = self.local_train(model, round_index, measure_memory=measure_memory)
        weights = masked_weight_values(model, list(self.mask_shapes))
        new_masks, extra_flops = self.measured(lambda: self.update_masks(model, weights, round_index), model, metrics,
                                               measure_memory and self.config.fedspa.regrowth == "gradient")
        metrics.flops += extra_flops
        # uplink: the trained values at the new mask and its positions (dense entries whole); the server knows the
        # mask they were trained under, so it counts only the kept positions as trained, never the regrown ones
        payload = self.upload(model, weights, new_masks)
        regrown = {n: new_masks[n] & ~self.mask[n] for n in new_masks}
        self.regrown = regrown if any(bool(r.any()) for r in regrown.values()) else None
        self.mask = new_masks
        model.zero_grad(set_to_none=True)  # the kept model holds no gradients between rounds
        return payload, metrics

    def upload(self, model: nn.Module, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> bytes:
        """The payload: `weights` at `masks` with their positions, the other travelling entries whole; keeps the
        personal entries of `model` on the client."""
        state = model.state_dict()
        self.personal = {n: state[n].detach().clone() for n in self.personal_names}
        return comm.encode([(weights[n], masks[n], False) if n in masks else (state[n], None, False)
                            for n in self.wire_names])

    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        """w * m_k; with sparse execution on the layers it trains on (the same plan, the same prepared model),
        unless the model's eval-mode code does not run with them (e.g. a TransformerEncoderLayer's fast path reads
        its Linear weights itself): then dense, as the one-time probe found."""
        if self.config.fedspa.execution != "sparse" or self._sparse_evaluates is False:
            return self.received_model(downlink)
        model = self.model_for(downlink)
        if self._sparse_evaluates is None:
            try:
                with torch.no_grad():
                    copy.deepcopy(model).eval()(self.data.test_x[:2])
                self._sparse_evaluates = True
            except Exception as exc:  # noqa: BLE001  (whatever the user's model raises in eval mode)
                self._sparse_evaluates = False
                _log_once(f"fedspa: {type(self.models.template).__name__} does not evaluate with sparse layers "
                          f"({type(exc).__name__}: {exc}); it is evaluated as dense weights x mask", logging.INFO)
                return self._densified(model)
        return model

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"personal.{n}": t.detach().clone() for n, t in self.personal.items()}
        if self.mask is not None:
            state.update({f"mask.{n}": m.clone() for n, m in self.mask.items()})
        if self.regrown is not None:
            state.update({f"regrown.{n}": m.clone() for n, m in self.regrown.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        masks = {k[len("mask."):]: v for k, v in state.items() if k.startswith("mask.")}
        regrown = {k[len("regrown."):]: v for k, v in state.items() if k.startswith("regrown.")}
        personal = {k[len("personal."):]: v for k, v in state.items() if k.startswith("personal.")}
        unknown = set(state) - {f"mask.{n}" for n in masks} - {f"personal.{n}" for n in personal} \
            - {f"regrown.{n}" for n in regrown}
        if unknown or set(personal) != set(self.personal_names) or (masks and set(masks) != set(self.mask_shapes)) \
                or (regrown and (not masks or set(regrown) != set(self.mask_shapes))):
            raise ValueError(f"client state must hold mask.<name> for {sorted(self.mask_shapes)} (or none), "
                             f"optionally regrown.<name> for the same names, and personal.<name> for "
                             f"{self.personal_names}; got {sorted(state)}")
        if masks:
            self.check_masks("client state mask", masks)
        if regrown:
            check_tensors("client state regrown", regrown, self.mask_shapes, dtype=torch.bool)
            outside = [n for n in regrown if bool((regrown[n] & ~masks[n]).any())]
            if outside:
                raise ValueError(f"client state regrown {outside[0]} marks positions outside its mask")
        check_tensors("client state personal", personal, {n: self.models.shapes[n] for n in self.personal_names})
        self.forget_model()  # built for the state being replaced
        self.mask = {n: m.to(self.device) for n, m in masks.items()} if masks else None
        self.regrown = {n: m.to(self.device) for n, m in regrown.items()} if regrown else None
        self.personal = {n: v.to(self.device, self.models.dtypes[n]) for n, v in personal.items()}


class ModelCache:
    """The prepared models FedSpa clients keep between uses (``FedSpaClient.model_for``), within one budget of bytes
    for the whole process: a simulation of many clients keeps the most recently used ones, and a client whose model
    was evicted builds it again when it next trains or evaluates. The budget is ``$FEDSPA_MODEL_CACHE_MB`` (default
    1024; 0 keeps none)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._held: collections.OrderedDict[int, tuple[weakref.ref, int]] = collections.OrderedDict()

    def hold(self, client: FedSpaClient, nbytes: int) -> None:
        """`client` keeps a prepared model of `nbytes`; the least recently used others are evicted over budget (and
        this one too, if it alone exceeds the budget)."""
        self._held.pop(id(client), None)
        self._held[id(client)] = (weakref.ref(client), nbytes)
        total = 0
        for key in reversed(list(self._held)):  # the most recent first
            owner, size = self._held[key]
            holder = owner()
            if holder is not None and total + size <= self.budget_bytes:
                total += size
                continue
            if holder is not None:
                holder.forget_model()
            del self._held[key]


def _cache_budget() -> int:
    raw = os.environ.get("FEDSPA_MODEL_CACHE_MB", "1024")
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"FEDSPA_MODEL_CACHE_MB must be a number of megabytes, got {raw!r}") from None
    if not math.isfinite(megabytes) or megabytes < 0:
        raise ValueError(f"FEDSPA_MODEL_CACHE_MB must be a finite number >= 0, got {raw!r}")
    return int(megabytes * 2**20)


MODEL_CACHE = ModelCache(_cache_budget())

_LOGGED: set[str] = set()


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


def _report_masked_without_kernel(template: nn.Module, plan: dict[str, str], masks: dict[str, torch.Tensor],
                                  sparse_max_density: float) -> None:
    """One logged line naming the masked weights that would run sparse if a sparse layer existed for them."""
    missing = []
    for name, how in plan.items():
        if how == "masked" and int(masks[name].count_nonzero()) <= sparse_max_density * masks[name].numel():
            module_name, _, attr = name.rpartition(".")
            module = template.get_submodule(module_name) if module_name else template
            if attr == "weight" and sparse_layer_for(module) is not None:
                continue  # it has a sparse layer: it runs dense x mask because that was measured faster
            missing.append(f"{name} ({why_not_sparse(module, attr)})")
    if missing:
        _log_once(f"fedspa: no sparse kernel for {', '.join(missing)}: "
                  f"{'it runs' if len(missing) == 1 else 'they run'} as dense weights x mask")


def sparse_summary(config: ExperimentConfig) -> dict:
    return {"execution": config.fedspa.execution, "density": config.fedspa.density}


register("fedspa", server=FedSpaServer, client=FedSpaClient, config=FedSpaConfig, executions=EXECUTIONS,
         summary=sparse_summary)
