"""A SparseMatrix (or raw op arguments) tampered with in every way we know cannot make a kernel read out of
bounds: each case is a clean error on every backend. Each runs in a fresh process, so that a segfault fails the
test instead of killing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fedspa_kernels as fk

REPO = Path(__file__).resolve().parents[2]
BACKENDS = [b for b in ("reference", "cpp", "triton") if fk.available_backends()[b]]

# name -> code that must raise; S is a 20 x 30 SparseMatrix at density 0.3 (int16 columns), d (30 x 7) and e (20 x 7)
# operands
CASES = {
    "col at int16's minimum": "S.col_indices.data[4] = -2**15\nfk.spmm(S, d, backend=B)",
    "col at int16's maximum, transposed product": (
        "S.col_indices.data[-1] = 2**15 - 1\nfk.spmm(S, e, transpose=True, backend=B)"),
    "col through .data": "S.col_indices.data[0] = 30_000\nfk.spmm(S, d, backend=B)",
    "col through numpy": "S.col_indices.numpy()[3] = -5\nfk.spmm(S, d, backend=B)",
    "col unsorted in place": "S.col_indices.data[1] = S.col_indices[0]\nfk.sddmm(e, d.t(), S, backend=B)",
    "crow end through .data": "S.crow_indices.data[-1] += 5\nfk.spmm(S, d, backend=B)",
    "crow decreasing": "S.crow_indices.data[3] = 10**6\nfk.spmm(S, d, backend=B)",
    "transposed product, col through .data": "S.col_indices.data[0] = 30_000\nfk.spmm(S, e, transpose=True, backend=B)",
    "transposed product, col negative": "S.col_indices.numpy()[5] = -3\nfk.spmm(S, e, transpose=True, backend=B)",
    "transposed product, crow past the end": "S.crow_indices.data[-1] = 10**6\nfk.spmm(S, e, transpose=True, backend=B)",
    "to() after an in-place edit": "S.col_indices.data[0] = 30_000\nfk.spmm(S.to('cpu'), d, backend=B)",
    "replacing an index tensor": "S.col_indices = torch.zeros(S.nnz, dtype=torch.int32)",
    "replacing values": "S.values = torch.ones(3)",
    "changing the shape": "S.shape = (20, 40)",
    "shorter values in place": "S.values.data = torch.ones(3)\nfk.spmm(S, d, backend=B)",
    "backward through a pattern tampered after the forward": (
        "v = S.values.detach().requires_grad_()\nW = S.with_values(v)\n"
        "y = fk.sparse_linear(torch.randn(4, 30, requires_grad=True), W, backend=B)\n"
        "W.col_indices.data[2] = 30_000\ny.sum().backward()"),
    "conv weight through .data": (
        "W = fk.SparseMatrix.from_dense(torch.randn(4, 18), torch.rand(4, 18) < 0.5)\n"
        "W.col_indices.data[0] = 30_000\nfk.sparse_conv2d(torch.randn(2, 2, 5, 5), W, 3, padding=1, backend=B)"),
    "conv input gradient through .data": (
        "W = fk.SparseMatrix.from_dense(torch.randn(4, 18), torch.rand(4, 18) < 0.5)\n"
        "v = W.values.detach().requires_grad_()\nW2 = W.with_values(v)\n"
        "x = torch.randn(2, 2, 5, 5, requires_grad=True)\ny = fk.sparse_conv2d(x, W2, 3, padding=1, backend=B)\n"
        "W2.col_indices.data[0] = 30_000\ny.sum().backward()"),
    "sparse layer buffer": (
        "from fedspa.nn import SparseLinear\nlayer = SparseLinear(30, 20, torch.rand(20, 30) < 0.3, backend=B)\n"
        "layer.weight.col_indices.data[0] = 30_000\nlayer(torch.randn(4, 30))"),
    "raw op: column out of range": (
        "fk.ops.spmm.SPMM.kernel(B)(torch.ones(2), torch.tensor([0, 2]), torch.tensor([0, 10**6], "
        "dtype=torch.int32), torch.randn(4, 3))"),
    "raw op: int16 column out of range": (
        "fk.ops.spmm.SPMM.kernel(B)(torch.ones(2), torch.tensor([0, 2]), torch.tensor([0, 2**15 - 1], "
        "dtype=torch.int16), torch.randn(4, 3))"),
    "raw op: pointers past the end": (
        "fk.ops.sddmm.SDDMM.kernel(B)(torch.randn(1, 3), torch.randn(4, 3), torch.tensor([0, 10**9]), "
        "torch.tensor([0, 1], dtype=torch.int32))"),
}

_RUNNER = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import fedspa_kernels as fk
    torch.manual_seed(0)
    B = sys.argv[1]
    results = {}
    for name, code in json.loads(sys.argv[2]).items():
        S = fk.SparseMatrix.from_dense(torch.randn(20, 30), torch.rand(20, 30) < 0.3)
        d, e = torch.randn(30, 7), torch.randn(20, 7)
        try:
            exec(code)
            results[name] = "no error"
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a crash of another kind is a failure too
            results[name] = f"UNEXPECTED {type(exc).__name__}: {exc}"
    print(json.dumps(results))
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tampering_is_a_clean_error(backend):
    done = subprocess.run([sys.executable, "-c", _RUNNER, backend, json.dumps(CASES)], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, f"the process died (code {done.returncode}):\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {name: outcome for name, outcome in results.items()
           if outcome == "no error" or outcome.startswith("UNEXPECTED")}
    assert not bad, json.dumps(bad, indent=1)
    assert set(results) == set(CASES)
