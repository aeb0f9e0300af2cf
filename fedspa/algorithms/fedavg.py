"""FedAvg and the dense methods that split a model into a shared and a personal part.

FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 — dense local SGD, sample-weighted averaging, every client evaluated with the
global model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import comm
from ..metrics import training_flops_per_sample
from .base import Algorithm, ClientResult


class SplitFedAvg(Algorithm):
    """Dense local training; the parameters for which ``is_shared(name)`` holds are sent down, trained, sent up and
    averaged (weighted by samples); the rest stay on the client (its personal part, checkpointed with the run)."""

    name = "split_fedavg"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shared_names = [n for n, _ in self.global_model.named_parameters() if self.is_shared(n)]
        shared = set(self.shared_names)
        initial = {n: p.detach().clone() for n, p in self.global_model.named_parameters() if n not in shared}
        self.personal_params: list[dict[str, torch.Tensor]] = [
            {n: t.clone() for n, t in initial.items()} for _ in self.clients]

    def is_shared(self, name: str) -> bool:
        return True

    # ---------------------------------------------------------------------------------------------- pieces
    def _payload(self, model: nn.Module) -> bytes:
        params = dict(model.named_parameters())
        return comm.encode([(params[n], None, False) for n in self.shared_names]) if self.shared_names else b""

    def _load(self, model: nn.Module, payload: bytes, client: int) -> None:
        """model = the shared values from `payload` + client's personal values."""
        params = dict(model.named_parameters())
        entries = comm.decode(payload) if payload else []
        with torch.no_grad():
            for name, entry in zip(self.shared_names, entries):
                if entry.numel != params[name].numel():
                    raise ValueError(f"payload tensor for {name} has {entry.numel} values, the model "
                                     f"{params[name].numel()}")
                params[name].copy_(entry.values.reshape(params[name].shape))
            for name, value in self.personal_params[client].items():
                params[name].copy_(value)

    def received_model(self, client: int) -> tuple[nn.Module, bytes]:
        """The model client `client` starts its round with, and the payload it received."""
        payload = self._payload(self.global_model)
        model = self.model_fn()
        self._load(model, payload, client)
        return model, payload

    def keep_personal(self, model: nn.Module, client: int) -> None:
        shared = set(self.shared_names)
        self.personal_params[client] = {n: p.detach().clone() for n, p in model.named_parameters() if n not in shared}

    # ---------------------------------------------------------------------------------------------- round
    def client_round(self, client: int, round_index: int) -> ClientResult:
        model, payload_down = self.received_model(client)
        measure = self.measure_memory and client == self.sampled_clients(round_index)[0]
        loss, seen, peak = self.local_train(model, client, round_index, self.learning_rate(round_index),
                                            measure=measure)
        self.keep_personal(model, client)
        payload_up = self._payload(model)
        flops = float(seen * training_flops_per_sample(model, self.input_shape))
        return ClientResult(client, loss, seen, len(payload_up), len(payload_down), flops, peak,
                            extra={"payload": payload_up})

    def aggregate(self, results: list[ClientResult], round_index: int) -> None:
        payloads = [r.extra.pop("payload") for r in results]
        if not results or not self.shared_names:
            return
        params = dict(self.global_model.named_parameters())
        total = float(sum(r.samples for r in results))
        sums = {n: torch.zeros_like(params[n]) for n in self.shared_names}
        for r, payload in zip(results, payloads):  # the server averages what it decoded
            for name, entry in zip(self.shared_names, comm.decode(payload)):
                sums[name] += (r.samples / total) * entry.values.reshape(params[name].shape)
        with torch.no_grad():
            for name in self.shared_names:
                params[name].copy_(sums[name])

    def personal_model(self, client: int) -> nn.Module:
        model = copy.deepcopy(self.global_model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in self.personal_params[client].items():
                params[name].copy_(value)
        return model

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "personal": [{n: t.clone() for n, t in p.items()} for p in self.personal_params]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.personal_params = [{n: t.clone() for n, t in p.items()} for p in state["personal"]]


class FedAvg(SplitFedAvg):
    """Everything shared: one global model."""

    name = "fedavg"


def last_linear_names(model: nn.Module) -> set[str]:
    """Parameter names of the model's last Linear layer (its classifier head)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as the head")
    return {f"{linears[-1]}.{p}" for p, _ in model.get_submodule(linears[-1]).named_parameters()}
