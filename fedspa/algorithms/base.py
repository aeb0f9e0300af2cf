"""The client/server machinery every algorithm shares: sampling, local SGD, evaluation, dense payloads, state.

Every random draw comes from a generator seeded by (seed, client, round, purpose) (``fedspa.masks.client_generator``),
so a run resumed from a checkpoint repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig
from ..data import ClientData
from ..masks import client_generator
from ..metrics import peak_step_memory
from ..nn import training_memory_bytes

# purposes of the per-(client, round) generators
SHUFFLE, REGROW, SAMPLE, INIT, FINETUNE = 1, 2, 3, 4, 5


@dataclass
class ClientResult:
    """What one client's round produced, and what it cost."""

    client: int
    train_loss: float
    samples: int
    bytes_up: int
    bytes_down: int
    flops: float
    peak_memory: int | None = None
    extra: dict = field(default_factory=dict)


class Algorithm:
    """One federated algorithm. Subclasses implement ``client_round``, ``aggregate``, ``personal_model`` and their
    state; the loop, logging and checkpointing live in ``fedspa.train``."""

    name = "algorithm"

    def __init__(self, config: ExperimentConfig, clients: list[ClientData], model_fn: Callable[[], nn.Module],
                 input_shape: tuple[int, ...], num_classes: int) -> None:
        self.config = config
        self.clients = clients
        self.model_fn = model_fn
        self.input_shape = input_shape
        self.num_classes = num_classes
        torch.manual_seed(config.seed)  # the initial model; everything later uses explicit generators
        self.global_model = model_fn()
        self.measure_memory = config.measure_memory
        self.measurement_seconds = 0.0  # time spent profiling memory, excluded from the reported round times

    # ---------------------------------------------------------------------------------------------- round
    def sampled_clients(self, round_index: int) -> list[int]:
        count = max(1, int(round(self.config.client_fraction * len(self.clients))))
        order = torch.randperm(len(self.clients), generator=client_generator(self.config.seed, -1, SAMPLE, round_index))
        return sorted(order[:count].tolist())

    def learning_rate(self, round_index: int) -> float:
        return self.config.lr * self.config.lr_decay**round_index

    def client_round(self, client: int, round_index: int) -> ClientResult:
        raise NotImplementedError

    def aggregate(self, results: list[ClientResult], round_index: int) -> None:
        raise NotImplementedError

    def personal_model(self, client: int) -> nn.Module:
        """The model client `client` is evaluated with."""
        raise NotImplementedError

    def run_round(self, round_index: int) -> list[ClientResult]:
        results = [self.client_round(k, round_index) for k in self.sampled_clients(round_index)]
        self.aggregate(results, round_index)
        return results

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"global": copy.deepcopy(self.global_model.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.global_model.load_state_dict(state["global"])

    # ---------------------------------------------------------------------------------------------- pieces
    def local_train(self, model: nn.Module, client: int, round_index: int, lr: float, *,
                    epochs: int | None = None, params: list[nn.Parameter] | None = None,
                    after_backward: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
                    extra_loss: Callable[[], torch.Tensor] | None = None, purpose: int = SHUFFLE,
                    measure: bool = False) -> tuple[float, int, int | None]:
        """SGD on the client's training data: returns (mean loss, samples seen, peak step memory or None)."""
        cfg = self.config
        data = self.clients[client]
        parameters = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        generator = client_generator(cfg.seed, client, purpose, round_index)
        n = data.num_train
        batches_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total_steps = cfg.local_steps if cfg.local_steps is not None and epochs is None else \
            (epochs if epochs is not None else cfg.local_epochs) * batches_per_epoch
        model.train()
        loss_sum, seen, peak = 0.0, 0, None
        profiled_seconds, plain_seconds = None, []
        order = torch.randperm(n, generator=generator)
        for step in range(total_steps):
            position = step % batches_per_epoch
            if position == 0 and step > 0:
                order = torch.randperm(n, generator=generator)
            batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
            x, y = data.train_x[batch], data.train_y[batch]

            def one_step():
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                if extra_loss is not None:
                    loss = loss + extra_loss()
                loss.backward()
                if after_backward is not None:
                    after_backward()
                torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step()
                return loss

            began = time.perf_counter()
            if measure and step == 0:
                holder = {}

                def measured():
                    holder["loss"] = one_step()

                persistent = training_memory_bytes(model, optimizer)["total"]
                peak = peak_step_memory(measured, persistent)
                loss = holder["loss"]
                profiled_seconds = time.perf_counter() - began
            else:
                loss = one_step()
                plain_seconds.append(time.perf_counter() - began)
            loss_sum += float(loss.detach()) * len(batch)
            seen += len(batch)
        if profiled_seconds is not None and plain_seconds:
            # the profiled step is slower than a plain one: that excess is not training time
            self.measurement_seconds += max(0.0, profiled_seconds - sum(plain_seconds) / len(plain_seconds))
        return loss_sum / max(seen, 1), seen, peak

    @torch.no_grad()
    def evaluate(self, model: nn.Module, client: int) -> tuple[int, int]:
        """(correct, total) on the client's own test split."""
        data = self.clients[client]
        model.eval()
        correct = 0
        for start in range(0, data.test_y.numel(), 512):
            logits = model(data.test_x[start:start + 512])
            correct += int((logits.argmax(1) == data.test_y[start:start + 512]).sum())
        return correct, int(data.test_y.numel())

    def evaluate_all(self) -> dict:
        """Every client's personal model on its own test split: pooled accuracy and mean/std over clients."""
        per_client, correct_total, total = [], 0, 0
        for k in range(len(self.clients)):
            correct, count = self.evaluate(self.personal_model(k), k)
            per_client.append(correct / count if count else float("nan"))
            correct_total += correct
            total += count
        values = np.array([a for a in per_client if not math.isnan(a)])
        return {"acc_pooled": correct_total / total if total else float("nan"),
                "acc_mean": float(values.mean()) if values.size else float("nan"),
                "acc_std": float(values.std()) if values.size else float("nan"),
                "acc_per_client": per_client}

