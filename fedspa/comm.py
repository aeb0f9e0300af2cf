"""What crosses the wire: a compact binary encoding of (sparse) model payloads, whose length is what is counted.

A payload is a sequence of tensors, each one of:
  DENSE     all values (float32)
  BITMAP    a bitmap of the positions (ceil(n / 8) bytes) + the values there
  INDICES   int32 positions (4 bytes each) + the values there
  VALUES    the values at positions both sides already know (a client's mask, which it uploaded)
For a sparse tensor the encoder picks whichever of BITMAP and INDICES is smaller. The server
aggregates what it decodes, so the counted bytes are the bytes that carried the model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"FSP1"
DENSE, BITMAP, INDICES, VALUES = 0, 1, 2, 3
_HEADER = struct.Struct("<HBII")  # tensor id, kind, numel, count


@dataclass
class Entry:
    """One decoded tensor: flat positions (None for DENSE) and the values there."""

    kind: int
    numel: int
    positions: torch.Tensor | None
    values: torch.Tensor


def encode(tensors: list[tuple[torch.Tensor, torch.Tensor | None, bool]]) -> bytes:
    """Encodes (values, mask, positions_known) per tensor: mask None means dense; positions_known sends values only.

    `values` is the full dense tensor; the entries at the mask are sent.
    """
    parts = [MAGIC, struct.pack("<I", len(tensors))]
    for tensor_id, (values, mask, known) in enumerate(tensors):
        flat = values.detach().reshape(-1).to(torch.float32).cpu()
        numel = flat.numel()
        if mask is None:
            parts += [_HEADER.pack(tensor_id, DENSE, numel, numel), flat.numpy().tobytes()]
            continue
        flat_mask = mask.reshape(-1).cpu()
        positions = flat_mask.nonzero().squeeze(1)
        count = positions.numel()
        chosen = flat[positions].numpy().tobytes()
        if known:
            parts += [_HEADER.pack(tensor_id, VALUES, numel, count), chosen]
        elif (numel + 7) // 8 <= 4 * count:
            parts += [_HEADER.pack(tensor_id, BITMAP, numel, count), np.packbits(flat_mask.numpy()).tobytes(), chosen]
        else:
            parts += [_HEADER.pack(tensor_id, INDICES, numel, count), positions.to(torch.int32).numpy().tobytes(),
                      chosen]
    return b"".join(parts)


def decode(payload: bytes, known_positions: list[torch.Tensor | None] | None = None) -> list[Entry]:
    """The entries of a payload; VALUES entries take their positions from `known_positions` (flat int64).

    Raises:
        ValueError: a truncated or malformed payload.
    """
    if payload[:4] != MAGIC:
        raise ValueError("payload does not start with the fedspa magic")
    (count,) = struct.unpack_from("<I", payload, 4)
    offset, entries = 8, []
    try:
        for _ in range(count):
            tensor_id, kind, numel, n = _HEADER.unpack_from(payload, offset)
            offset += _HEADER.size
            positions = None
            if kind == BITMAP:
                nbytes = (numel + 7) // 8
                bits = np.unpackbits(np.frombuffer(payload, np.uint8, nbytes, offset))[:numel]
                positions = torch.from_numpy(np.flatnonzero(bits))
                offset += nbytes
            elif kind == INDICES:
                raw = np.frombuffer(payload, np.int32, n, offset)
                if n and (raw[0] < 0 or raw[-1] >= numel or np.any(np.diff(raw) <= 0)):
                    raise ValueError(f"tensor {tensor_id}: positions must be strictly increasing within [0, {numel})")
                positions = torch.from_numpy(raw.astype(np.int64))
                offset += 4 * n
            elif kind == VALUES:
                if known_positions is None or known_positions[tensor_id] is None:
                    raise ValueError(f"tensor {tensor_id} carries values only, but its positions are not known")
                positions = known_positions[tensor_id]
            elif kind != DENSE:
                raise ValueError(f"tensor {tensor_id} has an unknown kind {kind}")
            if positions is not None and positions.numel() != n:
                raise ValueError(f"tensor {tensor_id}: {positions.numel()} positions for {n} values")
            values = torch.from_numpy(np.frombuffer(payload, np.float32, n, offset).copy())
            offset += 4 * n
            entries.append(Entry(kind, numel, positions, values))
    except struct.error as exc:
        raise ValueError(f"truncated payload: {exc}") from None
    except ValueError as exc:
        if "buffer is smaller" in str(exc):  # numpy's frombuffer past the end
            raise ValueError(f"truncated payload: {exc}") from None
        raise
    if offset != len(payload):
        raise ValueError(f"payload has {len(payload) - offset} trailing bytes")
    return entries
