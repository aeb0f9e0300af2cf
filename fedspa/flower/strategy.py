"""FedSpaStrategy: FedSpa's server on Flower.

It keeps the dense global model and every client's last known mask (a ``fedspa.algorithms.FedSpa`` object, the
same code as ``fedspa.train``), samples the same clients per round as ``fedspa.train`` (seeded), sends each one
only the global values at its mask, checks every upload (``protocol.check_upload``) and folds the valid ones into
the global model with fedspa's scatter-add kernels. A client whose reply is missing, an error, or malformed (wrong
length, an index out of range, a NaN, another nnz) is dropped for the round with the reason logged; the round
completes with the others, and the dropped client's mask stays what the server last knew.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..algorithms import ClientResult, FedSpa
from ..config import ExperimentConfig
from ..models import build_model
from .protocol import check_upload, config_record, from_array_record, to_array_record

log = logging.getLogger("fedspa.flower")


class FedSpaStrategy(Strategy):
    """FedSpa's server. ``history`` holds one row per round, as ``fedspa.train`` logs them (plus ``dropped``)."""

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int,
                 round_timeout: float = 600.0) -> None:
        self.config = config.validate()
        if config.algorithm != "fedspa":
            raise ValueError(f"FedSpaStrategy runs algorithm=fedspa, the config says {config.algorithm}")
        self.algorithm = FedSpa(config, [None] * config.clients,
                                lambda: build_model(config.model, input_shape, num_classes), input_shape, num_classes)
        self.numels = {n: p.numel() for n, p in self.algorithm.global_model.named_parameters()}
        self.round_timeout = round_timeout
        self.nodes: dict[int, int] = {}  # client (partition id) -> node id
        self.history: list[dict] = []
        self._pending: dict[int, tuple[int, int]] = {}  # node id -> (client, bytes sent)
        self._row: dict = {}

    # ---------------------------------------------------------------------------------------------- helpers
    def _map_nodes(self, grid: Grid) -> None:
        """Asks every node which partition it plays (once)."""
        node_ids = list(grid.get_node_ids())
        record = RecordDict({"config": config_record(self.config)})
        replies = grid.send_and_receive([Message(record, dst_node_id=n, message_type="query") for n in node_ids],
                                        timeout=self.round_timeout)
        for reply in replies:
            if reply.has_error():
                log.warning("node %s did not say its partition: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            k = int(reply.content["metrics"]["partition-id"])
            if k in self.nodes:
                raise ValueError(f"partition {k} is played by two nodes ({self.nodes[k]} and "
                                 f"{reply.metadata.src_node_id})")
            self.nodes[k] = reply.metadata.src_node_id
        missing = sorted(set(range(self.config.clients)) - set(self.nodes))
        if missing:
            log.warning("no node plays partitions %s: they are skipped when sampled", missing)

    def _message(self, client: int, round_index: int, message_type: str) -> tuple[Message, int]:
        payload, _ = self.algorithm._downlink(client)
        record = RecordDict({"arrays": to_array_record(payload),
                             "config": config_record(self.config, round=round_index)})
        return Message(record, dst_node_id=self.nodes[client], message_type=message_type), len(payload)

    # ---------------------------------------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self._map_nodes(grid)
        t = server_round - 1
        messages, self._pending = [], {}
        sampled = self.algorithm.sampled_clients(t)
        self._row = {"round": server_round, "lr": self.algorithm.learning_rate(t), "sampled": sampled,
                     "dropped": {}, "started": time.perf_counter()}
        for k in sampled:
            if k not in self.nodes:
                self._row["dropped"][str(k)] = "no node plays this partition"
                continue
            message, size = self._message(k, t, "train")
            messages.append(message)
            self._pending[self.nodes[k]] = (k, size)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = server_round - 1
        results, answered = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._pending:
                continue
            k, bytes_down = self._pending[node]
            answered.add(node)
            reason = None
            if reply.has_error():
                reason = f"error reply: {reply.error.reason}"
            else:
                try:
                    payload = from_array_record(reply.content.array_records.get("arrays"))
                    expected = {m: int(mask.sum()) for m, mask in self.algorithm.masks[k].items()}
                    _, masks = check_upload(payload, self.numels, self.algorithm.shapes, expected)
                    metrics = reply.content["metrics"]
                    samples = int(metrics["num-examples"])
                    if samples < 1 or not math.isfinite(float(metrics["train_loss"])):
                        raise ValueError(f"bad metrics: {dict(metrics)}")
                except (ValueError, KeyError, TypeError) as exc:
                    reason = f"malformed upload: {exc}"
            if reason is not None:
                self._drop(server_round, k, reason)
                continue
            results.append(ClientResult(k, float(metrics["train_loss"]), samples, len(payload), bytes_down,
                                        float(metrics["flops"]), int(metrics["peak_memory"]) or None,
                                        extra={"payload": payload, "masks": masks}))
        for node, (k, _) in self._pending.items():
            if node not in answered:
                self._drop(server_round, k, f"no reply within {self.round_timeout:.0f} s")
        results.sort(key=lambda r: r.client)  # the order fedspa.train aggregates in
        self.algorithm.aggregate(results, t)
        samples = sum(r.samples for r in results)
        peaks = [r.peak_memory for r in results if r.peak_memory]
        self._row.update({
            "aggregated": [r.client for r in results],
            "train_loss": sum(r.train_loss * r.samples for r in results) / max(samples, 1),
            "bytes_up": sum(r.bytes_up for r in results),
            "bytes_down": sum(r.bytes_down for r in results),
            "flops": sum(r.flops for r in results),
            "peak_memory": max(peaks) if peaks else None,
        })
        return None, MetricRecord({"train_loss": self._row["train_loss"], "bytes_up": self._row["bytes_up"],
                                   "clients": len(results)})

    def _drop(self, server_round: int, client: int, reason: str) -> None:
        log.warning("round %d: client %d dropped (%s)", server_round, client, reason)
        self._row["dropped"][str(client)] = reason
        # the client may hold a mask we never accepted: the next downlink carries our positions again
        self.algorithm.server_knows_mask[client] = False

    # ---------------------------------------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._row["train_seconds"] = time.perf_counter() - self._row.pop("started")
        if server_round % self.config.eval_every != 0 and server_round != self.config.rounds:
            self._finish_round()
            return []
        self._eval_pending = {}
        messages = []
        for k, node in sorted(self.nodes.items()):
            message, _ = self._message(k, server_round - 1, "evaluate")
            messages.append(message)
            self._eval_pending[node] = k
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not getattr(self, "_eval_pending", None):
            return None
        per_client = [float("nan")] * self.config.clients
        correct_total = total = 0
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id not in self._eval_pending:
                continue
            metrics = reply.content["metrics"]
            k = self._eval_pending[reply.metadata.src_node_id]
            correct, count = int(metrics["correct"]), int(metrics["total"])
            per_client[k] = correct / count if count else float("nan")
            correct_total += correct
            total += count
        values = np.array([a for a in per_client if not math.isnan(a)])
        self._row.update({"acc_pooled": correct_total / total if total else float("nan"),
                          "acc_mean": float(values.mean()) if values.size else float("nan"),
                          "acc_std": float(values.std()) if values.size else float("nan"),
                          "acc_per_client": per_client})
        self._eval_pending = {}
        self._finish_round()
        return MetricRecord({"acc_pooled": self._row["acc_pooled"], "acc_mean": self._row["acc_mean"]})

    def _finish_round(self) -> None:
        self.history.append(self._row)
        log.info("round %d: %s", self._row["round"],
                 json.dumps({k: v for k, v in self._row.items() if k != "acc_per_client"}))

    def summary(self) -> None:
        log.info("FedSpaStrategy: %d clients, %.0f%% per round, density %.3f, %d rounds", self.config.clients,
                 100 * self.config.client_fraction, self.config.fedspa.density, self.config.rounds)
