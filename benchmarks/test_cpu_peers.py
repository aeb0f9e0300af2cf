"""CPU benchmark against the published peer: one training step of a sparse layer in fedspa, in SparseProp (IST-DASLab,
ICML 2023, the C++ sparse-backprop library for exactly these layers) and as a dense layer on a masked weight.

A train step is forward + input gradient + weight gradient (the first layer of a network needs no input gradient;
these layers all do). fp32, one process; ``FEDSPA_BENCH_THREADS`` threads (default 1) for torch and OpenMP alike;
``FEDSPA_BENCH_BATCH`` (default 32) sets the convolutions' batch.
SparseProp's convolution has two loop orders (``vectorizing_over_on``); both are timed and its faster one is the
peer, as its own ``sparsify_conv2d_auto`` would pick. A dense SGEMM measures the machine's achievable FLOP rate.

SparseProp is not a dependency: install it when asked (``scripts/setup.sh --peers``, pinned in
``requirements/peers.txt``); without it only fedspa and dense run. Nothing is installed at run time.

Run:  pytest benchmarks/test_cpu_peers.py --benchmark-json=bench.json && python benchmarks/report.py bench.json
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("FEDSPA_BENCH_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # SparseProp's OpenMP reads it when it loads

import pytest
import torch
from torch import nn

import fedspa_kernels as fk
from fedspa.nn import SparseConv2d, SparseLinear

torch.set_num_threads(THREADS)
try:
    from sparseprop.modules import SparseConv2d as PeerConv2d
    from sparseprop.modules import SparseLinear as PeerLinear
except ImportError:  # not installed: the peer's rows are skipped
    PeerConv2d = PeerLinear = None

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")

BATCH = int(os.environ.get("FEDSPA_BENCH_BATCH", "32"))  # the convolutions' batch (named when not 32)
_B = "" if BATCH == 32 else f" B={BATCH}"
# (name, cin, cout, hw, kernel, stride, padding, batch, densities)
CONVS = [
    (f"resnet stage1 64-64 32x32 k3{_B}", 64, 64, 32, 3, 1, 1, BATCH, (0.5, 0.2, 0.1, 0.05)),
    (f"resnet stage2 64-128 32x32 k3 s2{_B}", 64, 128, 32, 3, 2, 1, BATCH, (0.5, 0.1)),
    (f"resnet downsample 64-128 32x32 k1 s2{_B}", 64, 128, 32, 1, 2, 0, BATCH, (0.5, 0.1)),
    (f"resnet stage3 256-256 8x8 k3{_B}", 256, 256, 8, 3, 1, 1, BATCH, (0.5, 0.2, 0.1)),
]
# (name, in, out, rows of input, densities)
LINEARS = [
    ("linear 3136-512 batch 64 (default CNN fc)", 3136, 512, 64, (0.1, 0.05)),
    ("linear 768-3072 256 tokens", 768, 3072, 256, (0.1, 0.05)),
]
if os.environ.get("FEDSPA_BENCH_TINY"):  # the test suite's smoke run
    CONVS = [("tiny conv 8-8 8x8 k3", 8, 8, 8, 3, 1, 1, 2, (0.5,))]
    LINEARS = [("tiny linear 32-16", 32, 16, 4, (0.5,))]
IMPLEMENTATIONS = ["masked dense", "fedspa cpp", "sparseprop"]


def _conv_case(name, cin, cout, hw, k, stride, pad, batch, density):
    g = torch.Generator().manual_seed(cin * 1000 + cout + int(density * 100))
    dense = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    mask = torch.rand(dense.weight.shape, generator=g) < density
    with torch.no_grad():
        dense.weight.mul_(mask)
    x = torch.randn(batch, cin, hw, hw, generator=g)
    out_hw = (hw + 2 * pad - k) // stride + 1
    dy = torch.randn(batch, cout, out_hw, out_hw, generator=g)
    flops = 3 * 2 * batch * int(mask.sum()) * out_hw * out_hw  # forward, input grad, weight grad
    return dense, mask, x, dy, flops


def _linear_case(name, fin, fout, rows, density):
    g = torch.Generator().manual_seed(fin + fout + int(density * 100))
    dense = nn.Linear(fin, fout)
    mask = torch.rand(dense.weight.shape, generator=g) < density
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense, mask, torch.randn(rows, fin, generator=g), torch.randn(rows, fout, generator=g), \
        3 * 2 * rows * int(mask.sum())


def _layers(implementation, dense, mask, x, conv):
    """The layers to time (SparseProp's conv: both loop orders)."""
    if implementation == "masked dense":
        return {"": dense}
    if implementation == "fedspa cpp":
        return {"": (SparseConv2d if conv else SparseLinear).from_dense(dense, mask, backend="cpp")}
    if PeerLinear is None:
        pytest.skip("sparseprop is not installed (scripts/setup.sh --peers)")
    weight, bias = dense.weight.detach().clone(), nn.Parameter(dense.bias.detach().clone())
    if not conv:
        return {"": PeerLinear(weight, bias)}
    return {f" over_on={v}": PeerConv2d(weight, bias, padding=dense.padding[0], stride=dense.stride[0],
                                        vectorizing_over_on=v) for v in (False, True)}


def _step(layer, x, dy, mask, masked_dense):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(dy)
    if masked_dense:
        layer.weight.grad.mul_(mask)


def _bench(benchmark, group, implementation, dense, mask, x, dy, flops, conv, density, shape):
    layers = _layers(implementation, dense, mask, x, conv)
    x = x.clone().requires_grad_()
    reference = dense(x)
    if len(layers) > 1:  # SparseProp's conv: keep its faster loop order, decided on a few timed steps
        import time

        def cost(layer):
            _step(layer, x, dy, mask, False)
            began = time.perf_counter()
            for _ in range(3):
                _step(layer, x, dy, mask, False)
            return time.perf_counter() - began
        label = min(layers, key=lambda k: cost(layers[k]))
        layers = {label: layers[label]}
    (label, layer), = layers.items()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference, rtol=1e-3, atol=1e-3)  # the same layer, computed right
    role = {"masked dense": "baseline", "fedspa cpp": "ours", "sparseprop": "peer"}[implementation]
    benchmark.group = group
    benchmark.extra_info.update({"role": role, "implementation": implementation + label, "shape": shape,
                                 "density": density, "nnz": int(mask.sum()), "flops": flops, "threads": THREADS})
    benchmark(_step, layer, x, dy, mask, implementation == "masked dense")


CASES = [("conv", c, d) for c in CONVS for d in c[-1]] + [("linear", c, d) for c in LINEARS for d in c[-1]]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1][0]} d={c[2]}")
def test_train_step(benchmark, case, implementation):
    kind, shape, density = case
    dense, mask, x, dy, flops = (_conv_case if kind == "conv" else _linear_case)(*shape[:-1], density)
    _bench(benchmark, f"train step {shape[0]} d={density}", implementation, dense, mask, x, dy, flops,
           kind == "conv", density, shape[0])


def test_dense_sgemm_flop_rate(benchmark):
    """The FLOP rate this machine achieves (dense fp32 matmul at the benchmark's thread count): the limit."""
    n = 256 if os.environ.get("FEDSPA_BENCH_TINY") else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark.group = "dense sgemm (achievable FLOP rate)"
    benchmark.extra_info.update({"role": "baseline", "implementation": f"torch.mm {n}^3", "density": 1.0,
                                 "flops": 2 * n ** 3, "threads": THREADS})
    benchmark(torch.mm, a, b)
