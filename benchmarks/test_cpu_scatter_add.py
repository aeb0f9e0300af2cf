"""CPU benchmark: sparse scatter-add aggregation (FedSpa's server step) vs an index_add_ loop.

10 clients, n = 11M parameters (ResNet-18), density 0.5 per client, fp32 values, per-client weights.
The baseline is what one writes with PyTorch: per client, ``sum.index_add_(0, idx, w * val)`` and
``count.index_add_(0, idx, ones)``. Each group runs the baseline and our kernels on the same inputs in the
same process; a memory-bandwidth probe runs in the same session so results can be read against the machine.

Run:  pytest benchmarks/test_cpu_scatter_add.py --benchmark-json=bench.json
      python benchmarks/report.py bench.json
"""

from __future__ import annotations

import os

import pytest
import torch

import fedspa_kernels as fk

N = int(os.environ.get("FEDSPA_BENCH_N", 11_000_000))
CLIENTS = int(os.environ.get("FEDSPA_BENCH_CLIENTS", 10))
DENSITY = 0.5

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")


def _payloads(index_dtype: torch.dtype, shuffled: bool):
    generator = torch.Generator().manual_seed(1234)
    indices, values = [], []
    for _ in range(CLIENTS):
        mask = torch.rand(N, generator=generator) < DENSITY
        idx = mask.nonzero().squeeze(1)  # ascending, as a mask's positions are
        if shuffled:
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
        indices.append(idx.to(index_dtype).contiguous().clone())
        values.append(torch.randn(idx.numel(), generator=generator))
    weights = torch.rand(CLIENTS, generator=generator) + 0.5
    return indices, values, weights


@pytest.fixture(scope="module")
def sorted_int32():
    return _payloads(torch.int32, shuffled=False)


@pytest.fixture(scope="module")
def sorted_int64():
    return _payloads(torch.int64, shuffled=False)


@pytest.fixture(scope="module")
def shuffled_int64():
    return _payloads(torch.int64, shuffled=True)


def index_add_loop(indices, values, weights):
    """The baseline: sum and count, one client at a time."""
    total = torch.zeros(N)
    count = torch.zeros(N)
    for idx, val, w in zip(indices, values, weights):
        total.index_add_(0, idx, val * w)
        count.index_add_(0, idx, torch.ones_like(val))
    return total, count


def index_add_average(indices, values, weights, previous):
    """Baseline masked average: weighted sums with index_add_, then where(coverage > 0, sum / coverage, previous)."""
    total = torch.zeros(N)
    coverage = torch.zeros(N)
    for idx, val, w in zip(indices, values, weights):
        total.index_add_(0, idx, val * w)
        coverage.index_add_(0, idx, torch.full_like(val, float(w)))
    return torch.where(coverage > 0, total / coverage, previous)


def _input_bytes(indices, values) -> int:
    return sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in zip(indices, values))


def _record(benchmark, data, extra_output_bytes: int, implementation: str, baseline: bool) -> None:
    indices, values, _ = data
    benchmark.extra_info.update(
        {
            "implementation": implementation,
            "baseline": baseline,
            "clients": CLIENTS,
            "n": N,
            "density": DENSITY,
            "index_dtype": str(indices[0].dtype).replace("torch.", ""),
            "bytes": _input_bytes(indices, values) + extra_output_bytes,  # inputs read once + outputs written once
            "threads": torch.get_num_threads(),
        }
    )


BASELINE_ROUNDS = int(os.environ.get("FEDSPA_BENCH_BASELINE_ROUNDS", 5))
KERNEL_ROUNDS = int(os.environ.get("FEDSPA_BENCH_ROUNDS", 20))


@pytest.mark.parametrize("data_name", ["sorted_int32", "sorted_int64", "shuffled_int64"])
@pytest.mark.parametrize("implementation", ["index_add_", "fedspa cpp"])
def test_aggregate(benchmark, request, data_name, implementation):
    data = request.getfixturevalue(data_name)
    benchmark.group = f"aggregate sum+count, {data_name.replace('_', ' ')}"
    baseline = implementation == "index_add_"
    _record(benchmark, data, 2 * N * 4, implementation, baseline)
    if baseline:
        benchmark.pedantic(index_add_loop, args=data, rounds=BASELINE_ROUNDS, warmup_rounds=1)
    else:
        indices, values, weights = data
        result = benchmark.pedantic(fk.scatter_add_aggregate, args=(indices, values, N, weights),
                                    kwargs={"backend": "cpp"}, rounds=KERNEL_ROUNDS, warmup_rounds=2)
        expected = index_add_loop(*data)
        torch.testing.assert_close(result, expected)  # the timed kernel computes the right thing


@pytest.mark.parametrize("implementation", ["index_add_ + where", "fedspa cpp"])
def test_masked_average(benchmark, sorted_int32, implementation):
    indices, values, weights = sorted_int32
    previous = torch.randn(N, generator=torch.Generator().manual_seed(7))
    benchmark.group = "masked average, sorted int32"
    baseline = implementation != "fedspa cpp"
    _record(benchmark, sorted_int32, 2 * N * 4, implementation, baseline)  # + previous read, output written
    if baseline:
        benchmark.pedantic(index_add_average, args=(indices, values, weights, previous), rounds=BASELINE_ROUNDS,
                           warmup_rounds=1)
    else:
        result = benchmark.pedantic(fk.scatter_add_average, args=(indices, values, previous, weights),
                                    kwargs={"backend": "cpp"}, rounds=KERNEL_ROUNDS, warmup_rounds=2)
        torch.testing.assert_close(result, index_add_average(indices, values, weights, previous))


@pytest.mark.parametrize("kind", ["read (sum)", "copy"])
def test_memory_bandwidth(benchmark, kind):
    """The machine's limit in this session: a 400 MB read (torch.sum) and a 400 MB copy."""
    x = torch.randn(int(os.environ.get("FEDSPA_BENCH_PROBE_NUMEL", 100_000_000)))
    benchmark.group = "memory bandwidth"
    if kind == "copy":
        y = torch.empty_like(x)
        benchmark.extra_info.update({"implementation": kind, "bytes": 2 * x.numel() * 4, "probe": True})
        benchmark.pedantic(y.copy_, args=(x,), rounds=20, warmup_rounds=2)
    else:
        benchmark.extra_info.update({"implementation": kind, "bytes": x.numel() * 4, "probe": True})
        benchmark.pedantic(torch.sum, args=(x,), rounds=20, warmup_rounds=2)
