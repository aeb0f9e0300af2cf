"""What FedSpa's Flower apps exchange, and the server's checks on what comes back.

Every model payload is fedspa's own wire encoding (``fedspa.comm``: values plus a bitmap or int32 positions, or
values only once the server knows the client's mask), carried as one uint8 array in an ArrayRecord: never a
dense tensor of a sparse layer. The experiment config travels as JSON in the ConfigRecord, so every node runs the
same ``ExperimentConfig``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .. import comm
from ..config import ExperimentConfig

PAYLOAD = "payload"
CONFIG = "config"


def to_array_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord({PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def from_array_record(record: ArrayRecord | None) -> bytes:
    """The payload bytes of a record; ValueError when the record does not hold one uint8 vector."""
    if record is None or PAYLOAD not in record:
        raise ValueError("the reply carries no payload")
    array = record[PAYLOAD].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"the payload must be a 1-D uint8 array, got {array.dtype} of shape {array.shape}")
    return array.tobytes()


def config_record(config: ExperimentConfig, **extra) -> ConfigRecord:
    return ConfigRecord({CONFIG: json.dumps(config.to_dict()), **extra})


def config_from_record(record: ConfigRecord) -> ExperimentConfig:
    return ExperimentConfig.from_dict(json.loads(str(record[CONFIG]))).validate()


def check_upload(payload: bytes, numels: dict[str, int], shapes: dict[str, tuple[int, ...]],
                 expected_nnz: dict[str, int]) -> tuple[list[comm.Entry], dict[str, torch.Tensor]]:
    """Decodes a client's upload and checks it against the model before anything is aggregated.

    Args:
        numels: parameter name -> number of elements, in payload order.
        shapes: module name -> weight shape of the sparse layers (their weights are "<module>.weight").
        expected_nnz: module name -> the client's fixed number of active weights.

    Returns:
        The entries and the client's new masks (from the uploaded positions).

    Raises:
        ValueError: naming what is wrong (malformed bytes, wrong tensor count or size, a sparse layer sent dense or
        with another nnz, an index out of range, a non-finite value).
    """
    entries = comm.decode(payload)
    if len(entries) != len(numels):
        raise ValueError(f"{len(entries)} tensors in the payload, the model has {len(numels)}")
    masks = {}
    for (name, expected_numel), entry in zip(numels.items(), entries):
        if entry.numel != expected_numel:
            raise ValueError(f"{name} has {entry.numel} elements in the payload, the model {expected_numel}")
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in shapes:
            numel = math.prod(shapes[module])
            if entry.positions is None:
                raise ValueError(f"{name} was sent without positions")
            if entry.positions.numel() != expected_nnz[module]:
                raise ValueError(f"{name} has {entry.positions.numel()} active weights, the client's mask "
                                 f"{expected_nnz[module]}")
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[entry.positions] = True
            masks[module] = mask.reshape(shapes[module])
        elif entry.kind != comm.DENSE:
            raise ValueError(f"{name} must be sent dense")
        if not torch.isfinite(entry.values).all():
            bad = int((~torch.isfinite(entry.values)).nonzero()[0])
            raise ValueError(f"{name} has a non-finite value at position {bad}")
    return entries, masks
