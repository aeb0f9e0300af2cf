"""FederatedStrategy: the server half of any registered fedspa algorithm, on Flower.

It holds the algorithm's ``Server`` (the same class ``fedspa.train`` simulates) and uses only its public methods:
it samples the same clients per round as ``fedspa.train`` (seeded), sends each sampled node its ``downlink``,
passes every reply through ``receive`` (which checks the payload) and ``TrainMetrics.from_record``, and
``aggregate``s the valid ones. A client whose reply is missing, an error, or malformed (wrong length, an index out
of range, a NaN, another nnz, bad metrics) is dropped for the round with the reason logged (``Server.drop``); the
round completes with the others. For FedSpa the downlinks are sparse and the aggregation is fedspa's scatter-add.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from ..algorithms import ModelFactory, registry
from ..algorithms.base import EvalMetrics, TrainMetrics, Upload, learning_rate
from ..config import ExperimentConfig
from ..data import dataset_info
from ..device import resolve_device
from ..models import build_model
from ..train import evaluation_row, train_row
from .protocol import config_record, from_array_record, to_array_record

log = logging.getLogger("fedspa.flower")


class FederatedStrategy(Strategy):
    """The server of ``config.algorithm``. ``history`` holds one row per round, as ``fedspa.train`` logs them (plus
    ``aggregated`` and ``dropped``).

    Args:
        config: the experiment.
        round_timeout: seconds to wait for a round's replies.
        model_fn: the model (default: the config's ``model`` for the config's dataset).
    """

    def __init__(self, config: ExperimentConfig, round_timeout: float = 600.0,
                 model_fn: Callable[[], nn.Module] | None = None) -> None:
        self.config = config.validate()
        if model_fn is None:
            input_shape, num_classes = dataset_info(config.data)
            model_fn = lambda: build_model(config.model, input_shape, num_classes)  # noqa: E731
        models = ModelFactory(model_fn, config.seed)
        self.server = registry.get(config.algorithm).server(config, models, config.clients,
                                                            resolve_device(config.device))
        self.round_timeout = round_timeout
        self.nodes: dict[int, int] = {}  # client (partition id) -> node id
        self.history: list[dict] = []
        self._pending: dict[int, tuple[int, int]] = {}  # node id -> (client, bytes sent)
        self._eval_pending: dict[int, int] = {}
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

    def _message(self, client: int, round_index: int, message_type: str,
                 measure_memory: bool = False) -> tuple[Message, int]:
        payload = (self.server.downlink(client, round_index) if message_type == "train"
                   else self.server.evaluation_downlink(client, round_index))
        record = RecordDict({"arrays": to_array_record(payload),
                             "config": config_record(self.config, round=round_index, **{"measure-memory": measure_memory})})
        return Message(record, dst_node_id=self.nodes[client], message_type=message_type), len(payload)

    # ---------------------------------------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self._map_nodes(grid)
        t = server_round - 1
        messages, self._pending = [], {}
        sampled = self.server.sample(t)
        self._row = {"sampled": sampled, "dropped": {}, "started": time.perf_counter()}
        for position, k in enumerate(sampled):
            if k not in self.nodes:
                self._row["dropped"][str(k)] = "no node plays this partition"
                continue
            message, size = self._message(k, t, "train", measure_memory=self.config.measure_memory and position == 0)
            messages.append(message)
            self._pending[self.nodes[k]] = (k, size)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = server_round - 1
        received, uploads, answered = [], [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._pending:
                continue
            k, bytes_down = self._pending[node]
            answered.add(node)
            if reply.has_error():
                self._drop(server_round, k, f"error reply: {reply.error.reason}")
                continue
            try:
                payload = from_array_record(reply.content.array_records.get("arrays"))
                upload = Upload(k, payload, TrainMetrics.from_record(reply.content["metrics"]), bytes_down, t)
                received.append((k, self.server.receive(upload)))
                uploads.append(upload)
            except Exception as exc:  # noqa: BLE001  (whatever is wrong with a reply drops that client only)
                self._drop(server_round, k, f"malformed upload: {exc}")
        for node, (k, _) in self._pending.items():
            if node not in answered:
                self._drop(server_round, k, f"no reply within {self.round_timeout:.0f} s")
        received.sort(key=lambda item: item[0])  # the order fedspa.train aggregates in
        uploads.sort(key=lambda u: u.client)
        self.server.aggregate([r for _, r in received], t)
        row = {**train_row(t, learning_rate(self.config, t), self._row["sampled"], uploads, 0.0),
               **self.server.round_metrics()}
        self._row = {**row, "dropped": self._row["dropped"], "started": self._row["started"],
                     "aggregated": [u.client for u in uploads]}
        return None, MetricRecord({"train_loss": row["train_loss"], "bytes_up": row["bytes_up"],
                                   "clients": len(uploads)})

    def _drop(self, server_round: int, client: int, reason: str) -> None:
        log.warning("round %d: client %d dropped (%s)", server_round, client, reason)
        self._row["dropped"][str(client)] = reason
        self.server.drop(client)

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
        if not self._eval_pending:
            return None
        results: list[EvalMetrics | None] = [None] * self.config.clients
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id not in self._eval_pending:
                continue
            k = self._eval_pending[reply.metadata.src_node_id]
            try:
                results[k] = EvalMetrics.from_record(reply.content["metrics"])
            except Exception as exc:  # noqa: BLE001  (left out of the round's accuracy, with the reason)
                reason = f"malformed evaluation: {type(exc).__name__}: {exc}"
                self._row.setdefault("eval_dropped", {})[str(k)] = reason
                log.warning("round %d: client %d's evaluation left out (%s)", server_round, k, reason)
        self._row.update(evaluation_row(results))
        self._eval_pending = {}
        self._finish_round()
        return MetricRecord({"acc_pooled": self._row["acc_pooled"], "acc_mean": self._row["acc_mean"]})

    def _finish_round(self) -> None:
        self.history.append(self._row)
        log.info("round %d: %s", self._row["round"],
                 json.dumps({k: v for k, v in self._row.items() if k != "acc_per_client"}))

    def summary(self) -> None:
        log.info("FederatedStrategy: %s, %d clients, %.0f%% per round, %d rounds", self.config.algorithm,
                 self.config.clients, 100 * self.config.client_fraction, self.config.rounds)
