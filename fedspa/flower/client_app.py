"""FedSpa's Flower ClientApp: one client (``partition-id`` of ``num-partitions`` in the node config) that trains
its sparse local model on fedspa's kernels and updates its own mask.

The client computes exactly what client k computes in ``fedspa.train`` (the same ``FedSpa.client_round``, the same
seeded generators), from what it received: the global values at its mask (with the positions the first time) and
the experiment config. Between rounds it keeps only its mask, in ``context.state``.

Fault injection for tests (node config): ``fault`` = ``crash`` (the process exits), ``nan``, ``bad-index`` or
``truncate`` (a malformed upload), in round ``fault-round`` (1-based, default 2).
"""

from __future__ import annotations

import functools
import json
import os
import struct

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import comm
from ..algorithms import FedSpa
from ..config import ExperimentConfig
from ..data import federated_data
from ..models import build_model
from .protocol import config_from_record, from_array_record, to_array_record

app = ClientApp()
MASKS = "fedspa-masks"


@functools.lru_cache(maxsize=2)
def _algorithm(config_json: str) -> FedSpa:
    """A FedSpa object holding every client's data partition (deterministic from the config), used for the one
    client this node plays."""
    config = ExperimentConfig.from_dict(json.loads(config_json)).validate()
    if config.fedspa.regrown_init != "zero":
        raise ValueError("the Flower client supports fedspa.regrown_init=zero only (the client would have to fetch "
                         "global values at its regrown positions)")
    clients, classes, shape, _ = federated_data(config.data, config.clients)
    return FedSpa(config, clients, lambda: build_model(config.model, shape, classes), shape, classes)


def _partition(context: Context, config: ExperimentConfig) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("the node config has no partition-id (start the SuperNode with --node-config "
                         "\"partition-id=<k> num-partitions=<n>\")")
    k, n = int(context.node_config["partition-id"]), int(context.node_config.get("num-partitions", config.clients))
    if n != config.clients or not 0 <= k < n:
        raise ValueError(f"partition-id={k} of num-partitions={n} does not fit an experiment of {config.clients} "
                         "clients")
    return k


def _receive(message: Message, context: Context) -> tuple[FedSpa, int, int, bytes]:
    """Puts what the server sent into the local FedSpa object: the client's mask and the global values on it."""
    config_record = message.content["config"]
    config = config_from_record(config_record)
    algorithm = _algorithm(json.dumps(config.to_dict()))
    k = _partition(context, config)
    payload = from_array_record(message.content.array_records.get("arrays"))
    names = [n for n, _ in algorithm.global_model.named_parameters()]
    stored = context.state.array_records.get(MASKS)
    if stored is not None:  # our mask, as we last uploaded it
        algorithm.masks[k] = {m: torch.from_numpy(stored[m].numpy().copy()) for m in algorithm.shapes}
    known = []
    for name in names:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        known.append(algorithm.masks[k][module].reshape(-1).nonzero().squeeze(1) if module in algorithm.shapes
                     else None)
    entries = comm.decode(payload, known if stored is not None else None)
    params = dict(algorithm.global_model.named_parameters())
    with torch.no_grad():
        for name, entry in zip(names, entries):
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if entry.positions is None:
                params[name].copy_(entry.values.reshape(params[name].shape))
                continue
            if entry.kind != comm.VALUES and module in algorithm.shapes:  # the server told us our mask
                mask = torch.zeros(entry.numel, dtype=torch.bool)
                mask[entry.positions] = True
                algorithm.masks[k][module] = mask.reshape(algorithm.shapes[module])
            flat = params[name].detach().reshape(-1)
            flat.zero_()
            flat[entry.positions] = entry.values
    algorithm.server_knows_mask[k] = any(e.kind == comm.VALUES for e in entries)
    _store_masks(context, algorithm, k)
    return algorithm, k, int(config_record["round"]), payload


def _store_masks(context: Context, algorithm: FedSpa, k: int) -> None:
    context.state.array_records[MASKS] = ArrayRecord(
        {m: Array(np.ascontiguousarray(mask.numpy())) for m, mask in algorithm.masks[k].items()})


def _inject_fault(context: Context, round_index: int, payload: bytes) -> bytes:
    fault = str(context.node_config.get("fault", ""))
    if not fault or int(context.node_config.get("fault-round", 2)) != round_index + 1:
        return payload
    if fault == "crash":
        os._exit(17)
    if fault == "truncate":
        return payload[: len(payload) // 2]
    data = bytearray(payload)
    header = struct.calcsize("<HBII")
    offset = 8
    tensor_id, kind, numel, count = struct.unpack_from("<HBII", data, offset)
    if fault == "bad-index":  # the first tensor's first position, out of range (INDICES or a bitmap's length)
        if kind == comm.INDICES:
            struct.pack_into("<i", data, offset + header, numel + 5)
        else:
            struct.pack_into("<HBII", data, offset, tensor_id, comm.INDICES, numel, count)
            struct.pack_into("<i", data, offset + header, numel + 5)
        return bytes(data)
    if fault == "nan":  # the last 4 bytes are the last tensor's last value
        struct.pack_into("<f", data, len(data) - 4, float("nan"))
        return bytes(data)
    raise ValueError(f"unknown fault {fault!r}")


@app.train()
def train(message: Message, context: Context) -> Message:
    algorithm, k, round_index, payload_down = _receive(message, context)
    result = algorithm.client_round(k, round_index)
    algorithm.masks[k] = result.extra["masks"]
    algorithm.server_knows_mask[k] = True
    _store_masks(context, algorithm, k)
    payload_up = _inject_fault(context, round_index, result.extra["payload"])
    metrics = MetricRecord({"client": k, "train_loss": float(result.train_loss), "num-examples": result.samples,
                            "flops": float(result.flops), "bytes_down": len(payload_down),
                            "peak_memory": int(result.peak_memory or 0)})
    return Message(RecordDict({"arrays": to_array_record(payload_up), "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    algorithm, k, _, _ = _receive(message, context)
    correct, total = algorithm.evaluate(algorithm.personal_model(k), k)
    return Message(RecordDict({"metrics": MetricRecord({"client": k, "correct": correct, "total": total})}),
                   reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node plays (the server maps clients to nodes with it)."""
    config = config_from_record(message.content["config"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": _partition(context, config)})}),
                   reply_to=message)
