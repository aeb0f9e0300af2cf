"""FedSpa: personalized sparse masks, sparse-to-sparse local training, mask evolution, sparse aggregation.

Huang, Liu, Shen, He, Lin, Tao, "Achieving Personalized Federated Learning with Sparse Local Models",
arXiv:2201.11380 (2022); the defaults follow shared/fedspa.md (the sibling DisPFL code where the paper is silent):

  1. The server keeps a dense global model and sends each sampled client only the global values at the client's
     active positions (the positions themselves only the first time: afterwards the server knows the client's
     mask from its last upload).
  2. The client trains only its active weights: its Linear/Conv2d layers are SparseLinear/SparseConv2d on
     fedspa_kernels (``fedspa.execution = sparse``); ``dense_masked`` runs dense weights times the mask instead,
     as most FL code does, to measure what the sparse path saves. 1-D tensors stay dense.
  3. After local training the client updates its mask (every ``mask_update_interval`` rounds): each layer drops
     round(alpha_t * nnz_l) active weights of smallest |w| and regrows as many inactive positions, by a random
     score (default) or |gradient| of one dense minibatch; alpha_t anneals with a cosine; regrown weights start
     at 0 (or at the global value). One fedspa_kernels.prune_regrow call covers every layer.
  4. The client uploads its values at its new mask and the mask (bitmap or int32 positions, the smaller).
  5. The server aggregates with one fedspa_kernels scatter-add call over all sampled clients and all sparse
     tensors: ``holders`` (default) averages each position over the clients holding it and keeps the previous
     value where nobody does; ``mean`` adds the average of the sparse updates m_k * (w_k - w).
  6. Client k's personal model is the global model times its mask.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fedspa_kernels as fk

from .. import comm
from ..masks import client_generator, layer_densities, random_masks, sparsifiable_shapes
from ..metrics import forward_flops, training_flops_per_sample
from ..nn import SparseConv2d, SparseLinear, sparsify
from ..schedule import drop_counts, drop_fraction
from .base import INIT, REGROW, SHUFFLE, Algorithm, ClientResult


class FedSpa(Algorithm):
    name = "fedspa"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config.fedspa
        self.shapes = sparsifiable_shapes(self.global_model)  # module name -> weight shape
        self.densities = layer_densities(self.shapes, cfg.density, cfg.mask_init)
        self.masks = [random_masks(self.shapes, self.densities, client_generator(self.config.seed, k, INIT))
                      for k in range(len(self.clients))]
        self.server_knows_mask = [False] * len(self.clients)  # the first downlink carries the positions
        self.sparse_params = [f"{name}.weight" for name in self.shapes]
        self._flops_cache: dict[int, int] = {}

    # ---------------------------------------------------------------------------------------------- pieces
    def _downlink(self, client: int) -> tuple[bytes, list[comm.Entry]]:
        masks = self.masks[client]
        items, known = [], []
        for name, param in self.global_model.named_parameters():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in masks:
                items.append((param, masks[module], self.server_knows_mask[client]))
                known.append(masks[module].reshape(-1).nonzero().squeeze(1))
            else:
                items.append((param, None, False))
                known.append(None)
        payload = comm.encode(items)
        return payload, comm.decode(payload, known)

    def _client_model(self, client: int, entries: list[comm.Entry]) -> nn.Module:
        """The client's model built from what it received: sparse layers, or dense weights x mask."""
        model = self.model_fn()
        with torch.no_grad():
            for (name, param), entry in zip(model.named_parameters(), entries):
                flat = torch.zeros(param.numel()) if entry.positions is not None else None
                if flat is None:
                    param.copy_(entry.values.reshape(param.shape))
                else:
                    flat[entry.positions] = entry.values
                    param.copy_(flat.reshape(param.shape))
        sparse = {name: self.masks[client][name] for name in self._sparse_layers(client)}
        return sparsify(model, sparse, inplace=True) if sparse else model

    def _sparse_layers(self, client: int) -> list[str]:
        """The layers client `client` runs on sparse kernels: all of them in sparse execution, except layers whose
        mask is denser than ``fedspa.sparse_max_density`` (where the sparse format costs more than it saves; an
        all-ones mask, e.g. a layer ERK keeps dense, runs as an ordinary layer); none in dense-masked execution."""
        cfg = self.config.fedspa
        if cfg.execution == "dense_masked":
            return []
        return [name for name, m in self.masks[client].items()
                if float(m.float().mean()) <= cfg.sparse_max_density and not bool(m.all())]

    def _dense_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Module name -> the current dense-shaped weight (zeros off the mask)."""
        out = {}
        for name in self.shapes:
            layer = model.get_submodule(name)
            if isinstance(layer, (SparseLinear, SparseConv2d)):
                out[name] = layer.weight.dense().detach().reshape(self.shapes[name])
            else:
                out[name] = layer.weight.detach().clone()
        return out

    def _gradient_scores(self, client: int, trained_model: nn.Module, weights: dict[str, torch.Tensor],
                         round_index: int) -> dict[str, torch.Tensor]:
        """|dense gradient| of one minibatch at the current (masked) weights: RigL's regrowth score."""
        model = self.model_fn()
        params = dict(model.named_parameters())
        trained = dict(trained_model.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in weights:
                    param.copy_(weights[module])
                elif name in trained:
                    param.copy_(trained[name])
        data = self.clients[client]
        order = torch.randperm(data.num_train, generator=client_generator(self.config.seed, client, REGROW, round_index))
        batch = order[: self.config.batch_size]
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
        return {name: model.get_submodule(name).weight.grad.abs() for name in self.shapes}

    def _flops_per_sample(self, model: nn.Module) -> int:
        return training_flops_per_sample(model, self.input_shape)

    def update_masks(self, client: int, model: nn.Module, weights: dict[str, torch.Tensor],
                     round_index: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """FedSpa's mask update after local training (prune smallest |w|, regrow as many, cosine-annealed count).
        Updates `weights` in place (zero off the new mask); returns (new masks, extra downlink bytes, extra FLOPs)."""
        cfg = self.config
        masks = self.masks[client]
        interval = cfg.fedspa.mask_update_interval
        fraction = drop_fraction(round_index, cfg.rounds, cfg.fedspa.drop_fraction) if round_index % interval == 0 else 0.0
        if fraction <= 0:
            return masks, 0, 0.0
        names = list(self.shapes)
        extra_down, extra_flops = 0, 0.0
        if cfg.fedspa.regrowth == "gradient":
            scores = self._gradient_scores(client, model, weights, round_index)
            extra_flops = 3.0 * forward_flops(self.model_fn(), torch.zeros(cfg.batch_size, *self.input_shape))
        else:
            generator = client_generator(cfg.seed, client, REGROW, round_index)
            scores = {name: torch.rand(self.shapes[name], generator=generator) for name in names}
        counts = drop_counts([int(masks[n].sum()) for n in names], [masks[n].numel() for n in names], fraction)
        result = fk.prune_regrow([weights[n] for n in names], [masks[n] for n in names],
                                 [scores[n] for n in names], counts, return_indices=True)
        new_masks = dict(zip(names, result.masks))
        for i, name in enumerate(names):
            w = weights[name] * new_masks[name]  # regrown weights start at 0
            if cfg.fedspa.regrown_init == "global":
                flat = w.reshape(-1)
                flat[result.regrown[i]] = self.global_model.get_submodule(name).weight.detach().reshape(-1)[
                    result.regrown[i]]
                extra_down += 4 * result.regrown[i].numel()  # the client fetches those values
            weights[name] = w
        return new_masks, extra_down, extra_flops

    # ---------------------------------------------------------------------------------------------- round
    def client_round(self, client: int, round_index: int) -> ClientResult:
        cfg = self.config
        lr = self.learning_rate(round_index)
        payload_down, entries = self._downlink(client)
        model = self._client_model(client, entries)
        masks = self.masks[client]
        after_backward = after_step = None
        sparse_layers = set(self._sparse_layers(client))
        masked = [name for name in self.shapes if name not in sparse_layers and not bool(masks[name].all())]
        if masked:  # dense weights x mask: gradients and weights outside the mask are zeroed every step
            layers = {name: model.get_submodule(name) for name in masked}

            def after_backward():
                for name, layer in layers.items():
                    if layer.weight.grad is not None:
                        layer.weight.grad.mul_(masks[name])

            def after_step():
                with torch.no_grad():
                    for name, layer in layers.items():
                        layer.weight.mul_(masks[name])

        measure = self.measure_memory and client == self.sampled_clients(round_index)[0]
        loss, seen, peak = self.local_train(model, client, round_index, lr, after_backward=after_backward,
                                            after_step=after_step, purpose=SHUFFLE, measure=measure)
        flops = float(seen * self._flops_per_sample(model))
        weights = self._dense_weights(model)
        new_masks, extra_down, extra_flops = self.update_masks(client, model, weights, round_index)
        flops += extra_flops
        # uplink: values at the new mask and its positions; dense tensors whole
        items = []
        trained = dict(model.named_parameters())
        for name, param in self.global_model.named_parameters():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in new_masks:
                items.append((weights[module], new_masks[module], False))
            else:
                items.append((trained[name].detach(), None, False))
        payload_up = comm.encode(items)
        return ClientResult(client, loss, seen, len(payload_up), len(payload_down) + extra_down, flops, peak,
                            extra={"payload": payload_up, "masks": new_masks})

    def aggregate(self, results: list[ClientResult], round_index: int) -> None:
        if not results:
            return
        cfg = self.config.fedspa
        params = dict(self.global_model.named_parameters())
        sparse = [name for name in self.sparse_params]
        offsets, total = {}, 0
        for name in sparse:
            offsets[name] = total
            total += params[name].numel()
        decoded = [comm.decode(r.extra["payload"]) for r in results]  # the server works on what was sent
        names = [name for name, _ in self.global_model.named_parameters()]
        position = {name: i for i, name in enumerate(names)}
        indices, values = [], []
        for entries in decoded:
            indices.append(torch.cat([entries[position[n]].positions + offsets[n] for n in sparse]))
            values.append(torch.cat([entries[position[n]].values for n in sparse]))
        weights = [float(r.samples) for r in results] if cfg.weighted_aggregation else None
        with torch.no_grad():
            previous = torch.cat([params[n].detach().reshape(-1) for n in sparse])
            if cfg.aggregation == "holders":
                merged = fk.scatter_add_average(indices, values, previous, weights)
            else:  # mean of the sparse updates: w + (1/S) sum_k m_k (w_k - w)
                deltas = [v - previous[i] for i, v in zip(indices, values)]
                scale = [1.0 / len(results)] * len(results)
                step, _ = fk.scatter_add_aggregate(indices, deltas, previous.numel(), scale)
                merged = previous + step
            for name in sparse:
                params[name].copy_(merged[offsets[name]:offsets[name] + params[name].numel()].reshape(params[name].shape))
            share = [float(r.samples) if cfg.weighted_aggregation else 1.0 for r in results]
            for name in names:
                if name in offsets:
                    continue
                stacked = torch.stack([entries[position[name]].values for entries in decoded])
                weight = torch.tensor(share).reshape(-1, *([1] * (stacked.dim() - 1)))
                params[name].copy_(((stacked * weight).sum(0) / sum(share)).reshape(params[name].shape))
        for r in results:
            self.masks[r.client] = r.extra.pop("masks")
            self.server_knows_mask[r.client] = True
            r.extra.pop("payload")

    def personal_model(self, client: int) -> nn.Module:
        model = copy.deepcopy(self.global_model)
        with torch.no_grad():
            for name, mask in self.masks[client].items():
                model.get_submodule(name).weight.mul_(mask)
        return model

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": [{n: m.clone() for n, m in masks.items()} for masks in self.masks],
                "server_knows_mask": list(self.server_knows_mask)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.masks = [{n: m.clone() for n, m in masks.items()} for masks in state["masks"]]
        self.server_knows_mask = list(state["server_knows_mask"])
