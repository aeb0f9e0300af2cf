"""fedspa's Flower ClientApp: one client (``partition-id`` of ``num-partitions`` in the node config) running the
client half of the configured algorithm on its own partition only.

The node builds the client half from the experiment config the server sends (the same ``Client`` class that
``fedspa.train`` simulates), loads only its own samples (the partition is computed from the labels, the other
clients' samples are never kept), and keeps the half's state (its mask, its personal layers) in
``context.state`` between rounds. What it computes is exactly what client k computes in ``fedspa.train``.

Fault injection for tests (node config): ``fault`` = ``crash`` (the process exits), ``nan``, ``bad-index`` or
``truncate`` (a malformed upload), ``metrics-missing`` (no ``flops``), ``metrics-nan`` (a NaN loss) or
``eval-metrics-missing`` (an evaluation without ``correct`` and ``total``), in round ``fault-round`` (1-based,
default 2).
"""

from __future__ import annotations

import functools
import json
import os
import struct

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import comm
from ..algorithms import ModelFactory, registry
from ..algorithms.base import Client
from ..config import ExperimentConfig
from ..data import ClientData, dataset_info, federated_data
from ..device import resolve_device
from ..models import build_model
from .protocol import config_from_record, from_array_record, state_from_record, state_to_record, to_array_record

app = ClientApp()
STATE = "fedspa-client-state"


@functools.lru_cache(maxsize=2)
def _resources(config_json: str, partition: int) -> tuple[ExperimentConfig, ClientData, ModelFactory]:
    """This node's config, its own data (one partition) and the model factory, built once per run config."""
    config = ExperimentConfig.from_dict(json.loads(config_json)).validate()
    data = federated_data(config.data, config.clients, only=partition)
    input_shape, num_classes = dataset_info(config.data)
    models = ModelFactory(lambda: build_model(config.model, input_shape, num_classes), config.seed)
    return config, data.clients[0], models


def _partition(context: Context, config: ExperimentConfig) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("the node config has no partition-id (start the SuperNode with --node-config "
                         "\"partition-id=<k> num-partitions=<n>\")")
    k, n = int(context.node_config["partition-id"]), int(context.node_config.get("num-partitions", config.clients))
    if n != config.clients or not 0 <= k < n:
        raise ValueError(f"partition-id={k} of num-partitions={n} does not fit an experiment of {config.clients} "
                         "clients")
    return k


def _client(message: Message, context: Context) -> tuple[Client, ExperimentConfig, int]:
    """The client half this node plays, with the state it kept from earlier rounds of this run."""
    config = config_from_record(message.content["config"])
    k = _partition(context, config)
    config, data, models = _resources(json.dumps(config.to_dict()), k)
    client = registry.get(config.algorithm).client(config, k, data, models, resolve_device(config.device))
    stored = context.state.array_records.get(STATE)
    if stored is not None:
        client.load_state_dict(state_from_record(stored))
    return client, config, k


def _fault(context: Context, round_index: int) -> str:
    fault = str(context.node_config.get("fault", ""))
    return fault if fault and int(context.node_config.get("fault-round", 2)) == round_index + 1 else ""


def _inject_metrics_fault(context: Context, round_index: int, record: dict) -> dict:
    fault = _fault(context, round_index)
    if fault == "metrics-missing":
        return {k: v for k, v in record.items() if k != "flops"}
    if fault == "metrics-nan":
        return {**record, "loss": float("nan")}
    return record


def _inject_fault(context: Context, round_index: int, payload: bytes) -> bytes:
    fault = _fault(context, round_index)
    if not fault or fault.startswith("metrics-"):
        return payload
    if fault == "crash":
        os._exit(17)
    if fault == "truncate":
        return payload[: len(payload) // 2]
    if fault == "bad-index":  # the first sparse tensor's last position, past its end (sizes all consistent)
        entries = comm.decode(payload)
        first = next(i for i, e in enumerate(entries) if e.positions is not None)
        entry = entries[first]
        positions = entry.positions.clone()
        positions[-1] = entry.numel + 5
        entries[first] = comm.Entry(comm.INDICES, entry.numel, positions, entry.values)
        return comm.encode_entries(entries)
    if fault == "nan":  # the last 4 bytes are the last tensor's last value
        data = bytearray(payload)
        struct.pack_into("<f", data, len(data) - 4, float("nan"))
        return bytes(data)
    raise ValueError(f"unknown fault {fault!r}")


@app.train()
def train(message: Message, context: Context) -> Message:
    client, config, k = _client(message, context)
    record = message.content["config"]
    round_index = int(record["round"])
    payload_down = from_array_record(message.content.array_records.get("arrays"))
    payload_up, metrics = client.round(payload_down, round_index,
                                       measure_memory=bool(record.get("measure-memory", False)))
    context.state.array_records[STATE] = state_to_record(client.state_dict())
    payload_up = _inject_fault(context, round_index, payload_up)
    reply = MetricRecord(_inject_metrics_fault(context, round_index,
                                               {"client": k, "num-examples": metrics.samples, **metrics.to_record()}))
    return Message(RecordDict({"arrays": to_array_record(payload_up), "metrics": reply}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    client, config, k = _client(message, context)
    payload = from_array_record(message.content.array_records.get("arrays"))
    metrics = client.evaluate(payload, int(message.content["config"]["round"]))
    context.state.array_records[STATE] = state_to_record(client.state_dict())
    record = {"client": k, **metrics.to_record()}
    if _fault(context, int(message.content["config"]["round"])) == "eval-metrics-missing":
        record = {key: v for key, v in record.items() if key not in ("correct", "total")}
    return Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node plays (the server maps clients to nodes with it)."""
    config = config_from_record(message.content["config"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": _partition(context, config)})}),
                   reply_to=message)
