"""CPU benchmark: a sparse Conv2d on fedspa's direct sparse convolution vs dense PyTorch and torch.sparse, one run.

Batch 32, fp32, the convolutions of the default CNN and of ResNet-18's stages, densities 0.5 / 0.3 / 0.1.
    forward     dense: F.conv2d with the masked weight      torch.sparse: im2col (F.unfold) + torch.sparse.mm(W_csr)
                fedspa: fk.sparse_conv2d (NCHW in and out, its layout transposes included)
    train step  forward + backward (input and weight gradients) of the layer: nn.Conv2d on a masked weight with
                a masked gradient (what masked-dense FL code runs) vs SparseConv2d
Memory of weights + gradients + SGD momentum (+ index buffers) is recorded for the training step.

Run:  pytest benchmarks/test_cpu_sparse_conv.py --benchmark-json=bench.json
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
from fedspa.nn import SparseConv2d, training_memory_bytes

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

BATCH = int(os.environ.get("FEDSPA_BENCH_BATCH", 32))
DENSITIES = [float(d) for d in os.environ.get("FEDSPA_BENCH_DENSITIES", "0.5,0.3,0.1").split(",")]
# (name, in_channels, out_channels, height = width, kernel, padding)
SHAPES = [
    ("cnn conv2 32-64 14x14 k5", 32, 64, 14, 5, 2),
    ("resnet stage1 64-64 32x32 k3", 64, 64, 32, 3, 1),
    ("resnet stage2 128-128 16x16 k3", 128, 128, 16, 3, 1),
    ("resnet stage3 256-256 8x8 k3", 256, 256, 8, 3, 1),
]

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")

_CASES: dict = {}


def _case(shape, density: float) -> dict:
    key = (shape[0], density)
    if key not in _CASES:
        _CASES.clear()
        name, cin, cout, hw, k, pad = shape
        g = torch.Generator().manual_seed(cin * 1000 + int(density * 100))
        conv = nn.Conv2d(cin, cout, k, padding=pad)
        mask = torch.rand(conv.weight.shape, generator=g) < density
        with torch.no_grad():
            conv.weight.mul_(mask)
        _CASES[key] = {
            "conv": conv,
            "mask": mask,
            "sparse": SparseConv2d.from_dense(conv, mask, backend="cpp"),
            "w_csr": conv.weight.detach().reshape(cout, -1).to_sparse_csr(),
            "x": torch.randn(BATCH, cin, hw, hw, generator=g),
            "dy": torch.randn(BATCH, cout, hw, hw, generator=g),
            "k": k, "pad": pad, "hw": hw,
        }
    return _CASES[key]


def _record(benchmark, role, implementation, shape, density, case, flops_factor=1, **extra):
    nnz = int(case["mask"].sum())
    benchmark.extra_info.update({"role": role, "implementation": implementation, "batch": BATCH, "shape": shape[0],
                                 "density": density, "nnz": nnz,
                                 "flops": flops_factor * 2 * BATCH * nnz * case["hw"] ** 2, **extra})


def _im2col_torch_sparse(c):
    cols = F.unfold(c["x"], c["k"], padding=c["pad"])  # (N, C*k*k, H*W)
    out = torch.sparse.mm(c["w_csr"], cols.permute(1, 0, 2).reshape(cols.shape[1], -1))
    return out.reshape(-1, BATCH, c["hw"], c["hw"]).permute(1, 0, 2, 3)


FORWARD = {
    "dense": ("baseline", lambda c: F.conv2d(c["x"], c["conv"].weight, c["conv"].bias, padding=c["pad"])),
    "im2col + torch.sparse": ("peer", lambda c: _im2col_torch_sparse(c) + c["conv"].bias.view(1, -1, 1, 1)),
    "fedspa cpp": ("ours", lambda c: c["sparse"](c["x"])),
}


@pytest.mark.parametrize("implementation", list(FORWARD))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@torch.no_grad()
def test_forward(benchmark, shape, density, implementation):
    case = _case(shape, density)
    role, fn = FORWARD[implementation]
    benchmark.group = f"forward {shape[0]} d={density}"
    _record(benchmark, role, implementation, shape, density, case)
    result = benchmark(fn, case)
    torch.testing.assert_close(result, FORWARD["dense"][1](case), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["masked dense", "fedspa cpp"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_train_step(benchmark, shape, density, implementation):
    case = _case(shape, density)
    x = case["x"].clone().requires_grad_()
    layer = case["conv"] if implementation == "masked dense" else case["sparse"]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(case["dy"])
        if implementation == "masked dense":
            layer.weight.grad.mul_(case["mask"])

    step()
    optimizer.step()
    memory = training_memory_bytes(layer, optimizer)
    benchmark.group = f"train step {shape[0]} d={density}"
    _record(benchmark, "baseline" if implementation == "masked dense" else "ours", implementation, shape, density,
            case, flops_factor=3, memory_bytes=memory)
    benchmark(step)
