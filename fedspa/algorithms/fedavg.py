"""FedAvg, and the machinery of every method that federates part of a dense model.

FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 — dense local SGD, sample-weighted averaging, every client evaluated with the
global model.

The model's state entries (parameters *and* buffers such as BatchNorm's running statistics) are split into the
shared ones (sent down, trained, sent up, averaged weighted by samples) and the personal ones (they stay on the
client, checkpointed with the run). ``is_shared`` decides; with ``norm_layers=local`` the parameters and
statistics of normalization layers are personal (FedBN: Li et al., ICLR 2021).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from .base import (Client, Server, TrainMetrics, Upload, check_tensors, decode_dense, encode_dense, last_linear_names,
                   load_state)
from .registry import register


class SharedEntries:
    """Which state entries a method federates; a mixin of both halves (they must agree)."""

    @functools.cached_property
    def local_norm_entries(self) -> set[str]:
        return self.models.norm_entries() if self.config.norm_layers == "local" else set()

    def is_shared(self, name: str) -> bool:
        return name not in self.local_norm_entries

    @functools.cached_property
    def shared_names(self) -> list[str]:
        return [n for n in self.models.names if self.is_shared(n)]

    @functools.cached_property
    def personal_names(self) -> list[str]:
        shared = set(self.shared_names)
        return [n for n in self.models.names if n not in shared]


class FedAvgServer(SharedEntries, Server):
    """Sends the shared entries of the global model; averages the uploads weighted by their samples."""

    def downlink(self, client: int, round_index: int) -> bytes:
        return encode_dense(self.global_model.state_dict(), self.shared_names)

    def receive(self, upload: Upload) -> tuple[Upload, dict[str, torch.Tensor]]:
        return upload, decode_dense(upload.payload, self.shared_names, self.models.shapes, self.device)

    def aggregate(self, received: list[tuple[Upload, dict[str, torch.Tensor]]], round_index: int) -> None:
        if not received or not self.shared_names:
            return
        total = float(sum(upload.metrics.samples for upload, _ in received))
        sums = {n: torch.zeros(self.models.shapes[n], dtype=torch.float32, device=self.device)
                for n in self.shared_names}
        for upload, values in received:  # the server averages what it decoded
            for name in self.shared_names:
                sums[name] += (upload.metrics.samples / total) * values[name].reshape(sums[name].shape)
        load_state(self.global_model, sums)


class FedAvgClient(SharedEntries, Client):
    """Trains the model made of the received shared entries and its own personal ones; uploads the shared."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.personal = {n: t.to(self.device) for n, t in self.models.initial_state(self.personal_names).items()}

    def received_model(self, downlink: bytes) -> nn.Module:
        """The model = the shared values from `downlink` + this client's personal values."""
        model = self.models.make(self.device)
        load_state(model, decode_dense(downlink, self.shared_names, self.models.shapes, self.device))
        load_state(model, self.personal)
        return model

    def keep_personal(self, model: nn.Module) -> None:
        state = model.state_dict()
        self.personal = {n: state[n].detach().clone() for n in self.personal_names}

    def upload(self, model: nn.Module) -> bytes:
        return encode_dense(model.state_dict(), self.shared_names)

    def round(self, downlink: bytes, round_index: int, *, measure_memory: bool = False) -> tuple[bytes, TrainMetrics]:
        model = self.received_model(downlink)
        metrics = self.train(model, round_index, measure_memory)
        self.keep_personal(model)
        return self.upload(model), metrics

    def train(self, model: nn.Module, round_index: int, measure_memory: bool) -> TrainMetrics:
        """The local update (FedAvg: plain SGD); variants such as FedProx override this."""
        return self.local_train(model, round_index, measure_memory=measure_memory)

    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        return self.received_model(downlink)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"personal.{n}": t.detach().clone() for n, t in self.personal.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_tensors("client state", state, {f"personal.{n}": self.models.shapes[n] for n in self.personal_names})
        self.personal = {n: state[f"personal.{n}"].to(self.device, self.models.dtypes[n]) for n in self.personal_names}


class HeadPersonal(SharedEntries):
    """The last Linear layer (the head) stays on the client: FedPer, FedRep."""

    @functools.cached_property
    def head_names(self) -> set[str]:
        return last_linear_names(self.models.template)

    def is_shared(self, name: str) -> bool:
        return name not in self.head_names and super().is_shared(name)


class HeadShared(HeadPersonal):
    """Only the last Linear layer is federated: LG-FedAvg."""

    def is_shared(self, name: str) -> bool:
        return name in self.head_names and SharedEntries.is_shared(self, name)


register("fedavg", server=FedAvgServer, client=FedAvgClient)
