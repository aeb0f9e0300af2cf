"""CPU benchmark: a sparse linear layer on fedspa's kernels vs dense PyTorch and torch.sparse, in one run.

Batch 256, weights 1024x1024 and 4096x4096, densities 0.5 / 0.2 / 0.1 / 0.05, fp32. For each of the layer's
three products, all implementations start from the same row-major tensors and produce the same result:
    forward          y  = x @ (W*M)^T         dense: x @ wm.T          torch.sparse: torch.sparse.mm(W_csr, x.T)
    backward-input   dx = dy @ (W*M)          dense: dy @ wm           torch.sparse: torch.sparse.mm(Wt_csr, dy.T)
    backward-weight  dW = (dy^T @ x) at M     dense: (dy.T @ x) * m    torch.sparse: sampled_addmm(M_csr, dy.T, x)
(torch.sparse gets its transposed CSR prebuilt, as fedspa caches its transpose metadata.) fedspa's times
include the transposes its kernels need. "train step" is forward + backward of the layer (input gradient
too) against F.linear on a masked dense weight whose gradient is masked, as masked-dense FL code does.
"optimizer step" times SGD with momentum and records the bytes of weights + gradients + momentum state
(+ the sparse pattern's index buffers), measured from the tensors that exist after a step.

Run:  pytest benchmarks/test_cpu_sparse_linear.py --benchmark-json=bench.json
      python benchmarks/report.py bench.json
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedspa_kernels as fk
from fedspa.nn import SparseLinear, training_memory_bytes

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

BATCH = int(os.environ.get("FEDSPA_BENCH_BATCH", 256))
SIZES = [int(s) for s in os.environ.get("FEDSPA_BENCH_SIZES", "1024,4096").split(",")]
DENSITIES = [float(d) for d in os.environ.get("FEDSPA_BENCH_DENSITIES", "0.5,0.2,0.1,0.05").split(",")]

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")

_CASES: dict = {}


def _case(size: int, density: float) -> dict:
    key = (size, density)
    if key not in _CASES:
        _CASES.clear()  # one case in memory at a time
        g = torch.Generator().manual_seed(size * 1000 + int(density * 100))
        w = torch.randn(size, size, generator=g) / size**0.5
        m = torch.rand(size, size, generator=g) < density
        wm = w * m
        _CASES[key] = {
            "x": torch.randn(BATCH, size, generator=g),
            "dy": torch.randn(BATCH, size, generator=g),
            "m": m,
            "wm": wm,
            "S": fk.SparseMatrix.from_dense(w, m),
            "w_csr": wm.to_sparse_csr(),
            "wt_csr": wm.t().contiguous().to_sparse_csr(),
            "m_csr": m.float().to_sparse_csr(),
        }
    return _CASES[key]


def _record(benchmark, role: str, implementation: str, size: int, density: float, nnz: int, **extra) -> None:
    benchmark.extra_info.update({"role": role, "implementation": implementation, "batch": BATCH, "size": size,
                                 "density": density, "nnz": nnz, "flops": 2 * BATCH * nnz, **extra})


PASSES = {
    "forward": {
        "dense": lambda c: c["x"] @ c["wm"].t(),
        "torch.sparse": lambda c: torch.sparse.mm(c["w_csr"], c["x"].t()),
        "fedspa cpp": lambda c: fk.sparse_linear(c["x"], c["S"], backend="cpp"),
    },
    "backward-input": {
        "dense": lambda c: c["dy"] @ c["wm"],
        "torch.sparse": lambda c: torch.sparse.mm(c["wt_csr"], c["dy"].t()),
        "fedspa cpp": lambda c: fk.spmm(c["S"], c["dy"].t(), transpose=True, backend="cpp"),
    },
    "backward-weight": {
        "dense": lambda c: (c["dy"].t() @ c["x"]) * c["m"],
        "torch.sparse": lambda c: torch.sparse.sampled_addmm(c["m_csr"], c["dy"].t(), c["x"], beta=0.0),
        "fedspa cpp": lambda c: fk.sddmm(c["dy"].t(), c["x"], c["S"], backend="cpp"),
    },
}
ROLES = {"dense": "baseline", "torch.sparse": "peer", "fedspa cpp": "ours"}


@pytest.mark.parametrize("implementation", list(ROLES))
@pytest.mark.parametrize("which", list(PASSES))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("size", SIZES)
def test_products(benchmark, size, density, which, implementation):
    case = _case(size, density)
    fn = PASSES[which][implementation]
    benchmark.group = f"{which} {size}x{size} d={density}"
    _record(benchmark, ROLES[implementation], implementation, size, density, case["S"].nnz)
    result = benchmark(fn, case)
    if implementation == "fedspa cpp":  # the timed kernel computes the right thing
        expected = PASSES[which]["dense"](case)
        if which == "backward-weight":
            expected = expected[case["m"]]
        got = result.t() if which == "backward-input" else result  # fedspa returns dx^T there (a free view)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["masked dense", "fedspa cpp"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("size", SIZES)
def test_train_step(benchmark, size, density, implementation):
    case = _case(size, density)
    x = case["x"].clone().requires_grad_()
    if implementation == "masked dense":
        weight = case["wm"].clone().requires_grad_()

        def step():
            weight.grad = x.grad = None
            F.linear(x, weight).backward(case["dy"])
            weight.grad.mul_(case["m"])
    else:
        layer = SparseLinear.from_dense(_dense_linear(case["wm"]), case["m"], backend="cpp")

        def step():
            layer.weight.values.grad = x.grad = None
            layer(x).backward(case["dy"])
    benchmark.group = f"train step {size}x{size} d={density}"
    _record(benchmark, "baseline" if implementation == "masked dense" else "ours", implementation, size, density,
            case["S"].nnz, flops=6 * BATCH * case["S"].nnz)
    benchmark(step)


@pytest.mark.parametrize("implementation", ["masked dense", "fedspa cpp"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("size", SIZES)
def test_optimizer_step_and_memory(benchmark, size, density, implementation):
    case = _case(size, density)
    if implementation == "masked dense":
        model = _dense_linear(case["wm"])
    else:
        model = SparseLinear.from_dense(_dense_linear(case["wm"]), case["m"], backend="cpp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(case["x"]).backward(case["dy"])
    optimizer.step()
    memory = training_memory_bytes(model, optimizer)
    benchmark.group = f"optimizer step {size}x{size} d={density}"
    _record(benchmark, "baseline" if implementation == "masked dense" else "ours", implementation, size, density,
            case["S"].nnz, flops=0, memory_bytes=memory)
    benchmark(optimizer.step)


def _dense_linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer
