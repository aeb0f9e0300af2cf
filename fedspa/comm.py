"""What crosses the wire: a compact binary encoding of (sparse) model payloads, whose length is what is counted.

A payload is ``b"FSP1"``, the tensor count (uint32), then per tensor a header (tensor id uint16 = its index, kind
uint8, numel uint32, count uint32) and its body, one of:
  DENSE     all values (float32); count == numel
  BITMAP    a bitmap of the positions (ceil(numel / 8) bytes, bits past numel zero) + the count values there
  INDICES   count int32 positions, strictly increasing in [0, numel) + the values there
  VALUES    the count values at positions both sides already know (a client's mask, which it uploaded)
For a sparse tensor the encoder picks whichever of BITMAP and INDICES is smaller. The server aggregates what it
decodes, so the counted bytes are the bytes that carried the model.

Decoding trusts nothing: with ``expect`` (what the receiver allows per tensor) every header is checked against it
and the whole payload's length is accounted for in a first pass that allocates nothing, so a payload can never make
the receiver allocate more than its own model legitimately needs; then every position's range and order and every
value's finiteness are checked. Whatever is wrong, the only error is ``ValueError``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"FSP1"
DENSE, BITMAP, INDICES, VALUES = 0, 1, 2, 3
KINDS = (DENSE, BITMAP, INDICES, VALUES)
SPARSE = frozenset({BITMAP, INDICES})
_HEADER = struct.Struct("<HBII")  # tensor id, kind, numel, count
_PREFIX = struct.Struct("<4sI")  # magic, tensor count
MAX_TENSORS = 65535  # the tensor id is a uint16


@dataclass
class Entry:
    """One decoded tensor: flat positions (None for DENSE) and the values there."""

    kind: int
    numel: int
    positions: torch.Tensor | None
    values: torch.Tensor


@dataclass(frozen=True)
class Expect:
    """What a receiver allows for one tensor: its element count, the kinds it accepts, and how many values (exactly
    ``count``, or at most ``numel`` when None)."""

    numel: int
    kinds: frozenset[int]
    count: int | None = None

    @classmethod
    def dense(cls, numel: int) -> Expect:
        return cls(numel, frozenset({DENSE}), numel)

    @classmethod
    def sparse(cls, numel: int, count: int | None = None) -> Expect:
        return cls(numel, SPARSE, count)


def encode(tensors: list[tuple[torch.Tensor, torch.Tensor | None, bool]]) -> bytes:
    """Encodes (values, mask, positions_known) per tensor: mask None means dense; positions_known sends values only.

    `values` is the full dense tensor; the entries at the mask are sent.
    """
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a payload holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    parts = [_PREFIX.pack(MAGIC, len(tensors))]
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


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """Encodes entries exactly as given (each in its own kind, positions as they are, checked or not): what a test
    or a fault injection needs to write a payload ``encode`` never would. VALUES entries send their values only."""
    parts = [_PREFIX.pack(MAGIC, len(entries))]
    for tensor_id, e in enumerate(entries):
        values = e.values.detach().reshape(-1).to(torch.float32).cpu().numpy().tobytes()
        parts.append(_HEADER.pack(tensor_id, e.kind, e.numel, e.values.numel()))
        if e.kind == BITMAP:
            bits = np.zeros(e.numel, dtype=np.uint8)
            bits[e.positions.cpu().numpy()] = 1
            parts.append(np.packbits(bits).tobytes())
        elif e.kind == INDICES:
            parts.append(e.positions.cpu().numpy().astype(np.int64).astype(np.int32).tobytes())
        parts.append(values)
    return b"".join(parts)


def unpack_bits(packed: np.ndarray, numel: int) -> np.ndarray:
    """The `numel` bits (uint8 0/1) of ``np.packbits`` output; ValueError if a padding bit past `numel` is set."""
    if numel % 8 and packed[-1] & (0xFF >> (numel % 8)):
        raise ValueError(f"the bitmap sets bits past its {numel} elements")
    return np.unpackbits(packed, count=numel)


def _body_size(kind: int, numel: int, count: int) -> int:
    positions = (numel + 7) // 8 if kind == BITMAP else 4 * count if kind == INDICES else 0
    return positions + 4 * count


def _headers(payload: bytes, expect: Sequence[Expect] | None) -> list[tuple[int, int, int, int]]:
    """Pass 1: every header checked and the payload's length accounted for; returns (kind, numel, count, offset)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ValueError(f"a payload must be bytes, got {type(payload).__name__}")
    if len(payload) < _PREFIX.size:
        raise ValueError(f"truncated payload: {len(payload)} bytes, a payload starts with {_PREFIX.size}")
    magic, count = _PREFIX.unpack_from(payload, 0)
    if magic != MAGIC:
        raise ValueError("payload does not start with the fedspa magic")
    if expect is not None and count != len(expect):
        raise ValueError(f"the payload holds {count} tensors, expected {len(expect)}")
    if count > (len(payload) - _PREFIX.size) // _HEADER.size:
        raise ValueError(f"truncated payload: {count} tensors announced in {len(payload)} bytes")
    offset, headers = _PREFIX.size, []
    for index in range(count):
        if offset + _HEADER.size > len(payload):
            raise ValueError(f"truncated payload: tensor {index}'s header is cut off")
        tensor_id, kind, numel, n = _HEADER.unpack_from(payload, offset)
        offset += _HEADER.size
        if tensor_id != index:
            raise ValueError(f"tensor {index} carries the id {tensor_id}")
        if kind not in KINDS:
            raise ValueError(f"tensor {index} has an unknown kind {kind}")
        if n > numel:
            raise ValueError(f"tensor {index} has {n} values for {numel} elements")
        if kind == DENSE and n != numel:
            raise ValueError(f"tensor {index} is dense with {n} values for {numel} elements")
        if expect is not None:
            want = expect[index]
            if kind not in want.kinds:
                raise ValueError(f"tensor {index} has kind {kind}, expected one of {sorted(want.kinds)}")
            if numel != want.numel:
                raise ValueError(f"tensor {index} has {numel} elements, the model {want.numel}")
            if want.count is not None and n != want.count:
                raise ValueError(f"tensor {index} has {n} values, expected {want.count}")
        headers.append((kind, numel, n, offset))
        offset += _body_size(kind, numel, n)
        if offset > len(payload):
            raise ValueError(f"truncated payload: tensor {index}'s body is cut off")
    if offset != len(payload):
        raise ValueError(f"payload has {len(payload) - offset} trailing bytes")
    return headers


def decode(payload: bytes, known_positions: list[torch.Tensor | None] | None = None, *,
           expect: Sequence[Expect] | None = None) -> list[Entry]:
    """The entries of a payload; VALUES entries take their positions from `known_positions` (flat int64).

    Args:
        expect: per tensor, what the receiver allows (element count, kinds, value count); checked for every header
            before anything is decoded, which bounds what decoding allocates by the receiver's own model.

    Raises:
        ValueError: anything malformed (truncated, another layout, positions out of range or order, non-finite
            values), and nothing else.
    """
    try:
        return _decode(payload, known_positions, expect)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001  (a decoder bug must not become a crash of the receiver)
        raise ValueError(f"malformed payload ({type(exc).__name__}: {exc})") from None


def _decode(payload, known_positions, expect) -> list[Entry]:
    headers = _headers(payload, expect)
    buffer = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    entries = []
    for index, (kind, numel, n, offset) in enumerate(headers):
        positions = None
        if kind == BITMAP:
            nbytes = (numel + 7) // 8
            try:  # one byte per element of the tensor: what its own size allows
                bits = unpack_bits(np.frombuffer(buffer, np.uint8, nbytes, offset), numel)
            except ValueError as exc:
                raise ValueError(f"tensor {index}: {exc}") from None
            if int(bits.sum()) != n:  # counted before any position is materialized
                raise ValueError(f"tensor {index}: the bitmap marks {int(bits.sum())} positions for {n} values")
            positions = torch.from_numpy(np.flatnonzero(bits))
            offset += nbytes
        elif kind == INDICES:
            raw = np.frombuffer(buffer, np.int32, n, offset)
            # comparisons, not differences: nothing can wrap around
            if n and (raw[0] < 0 or raw[-1] >= numel or bool(np.any(raw[1:] <= raw[:-1]))):
                raise ValueError(f"tensor {index}: positions must be strictly increasing within [0, {numel})")
            positions = torch.from_numpy(raw.astype(np.int64))
            offset += 4 * n
        elif kind == VALUES:
            if known_positions is None or index >= len(known_positions) or known_positions[index] is None:
                raise ValueError(f"tensor {index} carries values only, but its positions are not known")
            positions = known_positions[index]
            if positions.numel() != n:
                raise ValueError(f"tensor {index}: {positions.numel()} positions for {n} values")
        values = np.frombuffer(buffer, np.float32, n, offset)
        if not np.isfinite(values).all():
            first = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ValueError(f"tensor {index} has a non-finite value at position {first}")
        entries.append(Entry(kind, numel, positions, torch.from_numpy(values.copy())))
    return entries
