"""The wire encoding: round trips, the smaller of bitmap and indices, exact sizes, malformed payloads."""

from __future__ import annotations

import struct

import pytest
import torch

from fedspa import comm


def _mask(n, density, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density


def test_round_trip_of_every_kind():
    dense = torch.randn(3, 4)
    w = torch.randn(1000)
    bitmap_mask, index_mask = _mask(1000, 0.3), _mask(1000, 0.01, 1)
    known_mask = _mask(1000, 0.2, 2)
    payload = comm.encode([(dense, None, False), (w, bitmap_mask, False), (w, index_mask, False),
                           (w, known_mask, True)])
    known = [None, None, None, known_mask.nonzero().squeeze(1)]
    entries = comm.decode(payload, known)
    assert [e.kind for e in entries] == [comm.DENSE, comm.BITMAP, comm.INDICES, comm.VALUES]
    torch.testing.assert_close(entries[0].values, dense.reshape(-1))
    for entry, mask in zip(entries[1:], (bitmap_mask, index_mask, known_mask)):
        assert torch.equal(entry.positions, mask.nonzero().squeeze(1))
        torch.testing.assert_close(entry.values, w[mask])
        assert entry.numel == 1000


def test_sizes_are_the_smaller_encoding():
    n = 10_000
    header = 8 + struct.calcsize("<HBII")
    for density in (0.001, 0.02, 0.05, 0.5):
        mask = _mask(n, density)
        nnz = int(mask.sum())
        size = len(comm.encode([(torch.randn(n), mask, False)]))
        assert size == header + 4 * nnz + min((n + 7) // 8, 4 * nnz)
    assert len(comm.encode([(torch.randn(n), mask, True)])) == header + 4 * int(mask.sum())
    assert len(comm.encode([(torch.randn(n), None, False)])) == header + 4 * n


def test_malformed_payloads_are_rejected():
    w, mask = torch.randn(100), _mask(100, 0.3)
    payload = comm.encode([(w, mask, False)])
    with pytest.raises(ValueError, match="magic"):
        comm.decode(b"XXXX" + payload[4:])
    with pytest.raises(ValueError, match="truncated"):
        comm.decode(payload[:-3])
    with pytest.raises(ValueError, match="trailing bytes"):
        comm.decode(payload + b"\0")
    bad_kind = bytearray(payload)
    bad_kind[10] = 9  # the kind byte of the first header
    with pytest.raises(ValueError, match="unknown kind 9"):
        comm.decode(bytes(bad_kind))
    with pytest.raises(ValueError, match="positions are not known"):
        comm.decode(comm.encode([(w, mask, True)]))
    with pytest.raises(ValueError, match="positions for"):
        comm.decode(comm.encode([(w, mask, True)]), [torch.arange(3)])


def test_out_of_range_and_unsorted_positions_are_rejected():
    w = torch.randn(1000)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[[3, 500, 998]] = True
    payload = bytearray(comm.encode([(w, mask, False)]))
    start = 8 + struct.calcsize("<HBII")
    assert payload[10] == comm.INDICES
    for positions in ([3, 500, 1000], [3, 3, 998], [500, 3, 998], [-1, 3, 998]):
        payload[start:start + 12] = struct.pack("<3i", *positions)
        with pytest.raises(ValueError, match=r"strictly increasing within \[0, 1000\)"):
            comm.decode(bytes(payload))
