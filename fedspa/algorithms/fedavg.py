"""FedAvg: dense local SGD, sample-weighted averaging (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017). Every client is evaluated with the global model."""

from __future__ import annotations

import copy

from torch import nn

from .. import comm
from ..metrics import training_flops_per_sample
from .base import Algorithm, ClientResult, dense_payload, load_dense_payload, weighted_average_into


class FedAvg(Algorithm):
    name = "fedavg"

    def client_round(self, client: int, round_index: int) -> ClientResult:
        payload_down, _ = dense_payload(self.global_model)
        model = self.model_fn()
        load_dense_payload(model, payload_down)
        measure = self.measure_memory and client == self.sampled_clients(round_index)[0]
        loss, seen, peak = self.local_train(model, client, round_index, self.learning_rate(round_index),
                                            measure=measure)
        payload_up, _ = dense_payload(model)
        flops = float(seen * training_flops_per_sample(model, self.input_shape))
        return ClientResult(client, loss, seen, len(payload_up), len(payload_down), flops, peak,
                            extra={"payload": payload_up})

    def aggregate(self, results: list[ClientResult], round_index: int) -> None:
        if not results:
            return
        states = []
        for r in results:
            entries = comm.decode(r.extra.pop("payload"))
            states.append({n: e.values.reshape(p.shape) for (n, p), e in zip(self.global_model.named_parameters(), entries)})
        weighted_average_into(self.global_model, states, [float(r.samples) for r in results])

    def personal_model(self, client: int) -> nn.Module:
        return copy.deepcopy(self.global_model)
