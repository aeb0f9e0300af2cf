"""What fedspa's Flower apps exchange.

Every model payload is fedspa's own wire encoding (``fedspa.comm``, produced and checked by the algorithm's halves),
carried as one uint8 array in an ArrayRecord: never a dense tensor of a sparse layer. The experiment config travels
as JSON in the ConfigRecord, so every node runs the same ``ExperimentConfig``; metrics travel as the halves' typed
records (``TrainMetrics.to_record`` / ``EvalMetrics.to_record``). A client's state between rounds (its mask, its
personal layers) lives in the node's ``context.state`` as an ArrayRecord.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..config import ExperimentConfig

PAYLOAD = "payload"
CONFIG = "config"


def to_array_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord({PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def from_array_record(record: ArrayRecord | None) -> bytes:
    """The payload bytes of a record; ValueError when the record does not hold one uint8 vector."""
    if record is None or PAYLOAD not in record:
        raise ValueError("the message carries no payload")
    array = record[PAYLOAD].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"the payload must be a 1-D uint8 array, got {array.dtype} of shape {array.shape}")
    return array.tobytes()


def config_record(config: ExperimentConfig, **extra) -> ConfigRecord:
    return ConfigRecord({CONFIG: json.dumps(config.to_dict()), **extra})


def config_from_record(record: ConfigRecord) -> ExperimentConfig:
    return ExperimentConfig.from_dict(json.loads(str(record[CONFIG]))).validate()


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A client half's state (a flat dict of tensors) as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items()})


def state_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
