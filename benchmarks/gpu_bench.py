"""GPU benchmark: fedspa's CUDA and Triton kernels vs PyTorch on the same device, in one run.

    python benchmarks/gpu_bench.py [--ops scatter_add sparse_linear prune_regrow] [--out benchmarks/results]

sparse_linear compares, at batch 4096 and 1024^2 / 4096^2 weights of density 0.5-0.05, the forward,
backward-input and backward-weight products against cuBLAS in fp32 (TF32 off: the baseline), TF32 and bf16,
and torch.sparse CSR (cuSPARSE); the useful TFLOP/s (2 * batch * nnz / time) of every row is recorded.
prune_regrow updates the masks of a ResNet-18 (62 tensors, 11.2M weights) in one call, against a torch.topk loop
over its layers.

On CUDA, times are medians of ``triton.testing.do_bench`` (quantiles 0.5/0.2/0.8). Every implementation is
first checked against the baseline's result. Each row carries the minimum bytes the op must move (inputs read
once, outputs written once), the effective GB/s, and that as a fraction of the device-to-device copy bandwidth
measured in the same run. Results go to ``<out>/gpu_<op>_<device>_<date>.{json,csv}`` with the device name,
torch/triton/CUDA versions, date and shapes.

``--device cpu`` runs the same code with a CPU timer (torch.utils.benchmark) on tiny shapes; the test suite
uses it so the script cannot rot on machines without a GPU. GPU numbers come only from a GPU run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import fedspa_kernels as fk


@dataclasses.dataclass
class Row:
    op: str
    case: str
    implementation: str
    baseline: bool
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes: int
    gb_per_s: float
    fraction_of_copy_bandwidth: float | None = None
    speedup_vs_baseline: float | None = None
    shape: dict = dataclasses.field(default_factory=dict)


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """Returns fn -> (median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def cuda_timer(fn):
            median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
            return float(median), float(p20), float(p80)

        return cuda_timer

    from torch.utils.benchmark import Timer

    def cpu_timer(fn):
        measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
        times = sorted(measurement.times)
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
        return measurement.median * 1e3, pick(0.2), pick(0.8)

    return cpu_timer


def copy_bandwidth(device: torch.device, timer, numel: int) -> float:
    """Device-to-device copy, bytes read + written per second (the practical bandwidth ceiling)."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    median, _, _ = timer(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (median * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# scatter-add aggregation
# ----------------------------------------------------------------------------------------------------------------
def bench_scatter_add(device: torch.device, timer, args) -> list[Row]:
    n, clients, density = args.n, args.clients, args.density
    generator = torch.Generator().manual_seed(1234)
    rows: list[Row] = []
    for case, index_dtype, shuffled in (("sorted int32", torch.int32, False), ("sorted int64", torch.int64, False),
                                        ("shuffled int64", torch.int64, True)):
        indices, values = [], []
        for _ in range(clients):
            idx = (torch.rand(n, generator=generator) < density).nonzero().squeeze(1)
            if shuffled:
                idx = idx[torch.randperm(idx.numel(), generator=generator)]
            indices.append(idx.to(index_dtype).to(device))
            values.append(torch.randn(idx.numel(), generator=generator).to(device))
        weights = (torch.rand(clients, generator=generator) + 0.5).to(device)
        nbytes = sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in zip(indices, values))
        nbytes += 2 * n * 4  # sum and coverage written once

        def index_add_loop():
            total = torch.zeros(n, device=device)
            count = torch.zeros(n, device=device)
            for idx, val, w in zip(indices, values, weights):
                total.index_add_(0, idx, val * w)
                count.index_add_(0, idx, torch.ones_like(val))
            return total, count

        implementations: dict[str, Callable[[], object]] = {"index_add_ loop": index_add_loop}
        native = "cuda" if device.type == "cuda" else "cpp"
        for backend in (native, "triton"):
            if fk.available_backends("scatter_add_aggregate")[backend]:
                implementations[f"fedspa {backend}"] = (
                    lambda b=backend: fk.scatter_add_aggregate(indices, values, n, weights, backend=b)
                )
        expected = index_add_loop()
        for name, fn in implementations.items():
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4)
            median, p20, p80 = timer(fn)
            rows.append(Row("scatter_add_aggregate", case, name, name == "index_add_ loop", median, p20, p80, nbytes,
                            nbytes / (median * 1e-3) / 1e9,
                            shape={"n": n, "clients": clients, "density": density,
                                   "index_dtype": str(index_dtype).replace("torch.", "")}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# sparse linear layer: SpMM (forward, backward-input) and SDDMM (backward-weight)
# ----------------------------------------------------------------------------------------------------------------
def _tf32(enabled: bool, fn):
    def wrapped():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = enabled
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return wrapped


def bench_sparse_linear(device: torch.device, timer, args) -> list[Row]:
    """x (batch x size) @ (W*M)^T and its two gradients, fp32 unless the implementation says otherwise."""
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    rows: list[Row] = []
    generator = torch.Generator().manual_seed(1234)
    for size in args.sizes:
        for density in args.densities:
            w = (torch.randn(size, size, generator=generator) / size**0.5).to(device)
            m = (torch.rand(size, size, generator=generator) < density).to(device)
            wm = w * m
            x = torch.randn(args.batch, size, generator=generator).to(device)
            dy = torch.randn(args.batch, size, generator=generator).to(device)
            S = fk.SparseMatrix.from_dense(w, m)
            csr, csr_t, m_csr = wm.to_sparse_csr(), wm.t().contiguous().to_sparse_csr(), m.float().to_sparse_csr()
            wm_bf16, x_bf16, dy_bf16 = wm.bfloat16(), x.bfloat16(), dy.bfloat16()
            passes = {
                "forward": {
                    "dense fp32": lambda: x @ wm.t(),
                    "dense tf32": _tf32(True, lambda: x @ wm.t()),
                    "dense bf16": lambda: x_bf16 @ wm_bf16.t(),
                    "torch.sparse": lambda: torch.sparse.mm(csr, x.t()),
                    "fedspa {b}": lambda b: fk.sparse_linear(x, S, backend=b),
                },
                "backward-input": {
                    "dense fp32": lambda: dy @ wm,
                    "dense tf32": _tf32(True, lambda: dy @ wm),
                    "dense bf16": lambda: dy_bf16 @ wm_bf16,
                    "torch.sparse": lambda: torch.sparse.mm(csr_t, dy.t()),
                    "fedspa {b}": lambda b: fk.spmm(S, dy.t(), transpose=True, backend=b),
                },
                "backward-weight": {
                    "dense fp32": lambda: (dy.t() @ x) * m,
                    "dense tf32": _tf32(True, lambda: (dy.t() @ x) * m),
                    "dense bf16": lambda: (dy_bf16.t() @ x_bf16) * m,
                    "torch.sparse": lambda: torch.sparse.sampled_addmm(m_csr, dy.t(), x, beta=0.0),
                    "fedspa {b}": lambda b: fk.sddmm(dy.t(), x, S, backend=b),
                },
            }
            native = "cuda" if device.type == "cuda" else "cpp"
            backends = [b for b in (native, "triton") if fk.available_backends("spmm")[b]]
            flops = 2 * args.batch * S.nnz
            nbytes = 4 * (2 * args.batch * size) + 8 * S.nnz  # dense operands in and out, values + column indices
            for which, implementations in passes.items():
                expected = _tf32(False, implementations["dense fp32"])()
                if which == "backward-weight":
                    expected = expected[m]
                for name, fn in implementations.items():
                    if device.type != "cuda" and name in ("dense tf32", "dense bf16"):
                        continue  # GPU precisions
                    calls = {name.format(b=b): (lambda f=fn, b=b: f(b)) for b in backends} if "{b}" in name else {name: fn}
                    for label, call in calls.items():
                        if label.startswith("fedspa"):
                            got = call()
                            got = got.t() if which == "backward-input" else got
                            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
                        median, p20, p80 = timer(_tf32(False, call) if label in ("dense fp32", "torch.sparse") or
                                                 label.startswith("fedspa") else call)
                        rows.append(Row("sparse_linear", f"{which} {size}x{size} d={density}", label,
                                        label == "dense fp32", median, p20, p80, nbytes,
                                        nbytes / (median * 1e-3) / 1e9,
                                        shape={"batch": args.batch, "size": size, "density": density, "nnz": S.nnz,
                                               "tflop_per_s": flops / (median * 1e-3) / 1e12}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# prune/regrow: one call for every layer of a ResNet-18
# ----------------------------------------------------------------------------------------------------------------
def bench_prune_regrow(device: torch.device, timer, args) -> list[Row]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_shapes import resnet18_shapes

    generator = torch.Generator().manual_seed(1234)
    shapes = [(max(1, s[0] // args.prune_scale), *s[1:]) for s in resnet18_shapes()]
    rows: list[Row] = []
    for density in args.prune_densities:
        weights = [torch.randn(s, generator=generator).to(device) for s in shapes]
        masks = [(torch.rand(s, generator=generator) < density).to(device) for s in shapes]
        scores = [torch.rand(s, generator=generator).to(device) for s in shapes]
        counts = [min(int(round(0.1 * int(m.sum()))), int((~m).sum())) for m in masks]
        n = sum(w.numel() for w in weights)
        nbytes = n * (4 + 4 + 1 + 1)

        def topk_loop():
            new_masks = []
            for w, m, sc, k in zip(weights, masks, scores, counts):
                drop = torch.topk(w.abs().masked_fill(~m, float("inf")).reshape(-1), k, largest=False).indices
                grow = torch.topk(sc.masked_fill(m, float("-inf")).reshape(-1), k).indices
                new = m.clone().reshape(-1)
                new[drop] = False
                new[grow] = True
                new_masks.append(new.reshape(m.shape))
            return new_masks

        implementations: dict[str, Callable[[], object]] = {"torch.topk loop": topk_loop}
        native = "cuda" if device.type == "cuda" else "cpp"
        for backend in (native, "triton"):
            if fk.available_backends("prune_regrow")[backend]:
                implementations[f"fedspa {backend}"] = (
                    lambda b=backend: fk.prune_regrow(weights, masks, scores, counts, backend=b))
        expected = fk.prune_regrow(weights, masks, scores, counts, backend="reference")
        for name, fn in implementations.items():
            if name.startswith("fedspa"):
                assert all(torch.equal(a, b) for a, b in zip(fn(), expected)), f"{name} differs from the reference"
            median, p20, p80 = timer(fn)
            rows.append(Row("prune_regrow", f"resnet18 d={density}", name, name == "torch.topk loop", median, p20, p80,
                            nbytes, nbytes / (median * 1e-3) / 1e9,
                            shape={"tensors": len(shapes), "weights": n, "density": density, "drop_fraction": 0.1}))
    return rows


BENCHMARKS = {"scatter_add": bench_scatter_add, "sparse_linear": bench_sparse_linear, "prune_regrow": bench_prune_regrow}


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "backends": fk.available_backends(),
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "torch.utils.benchmark median",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=11_000_000, help="parameters (scatter_add)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--copy-numel", type=int, default=256 * 2**20, help="elements in the bandwidth probe")
    parser.add_argument("--batch", type=int, default=4096, help="rows of x (sparse_linear)")
    parser.add_argument("--sizes", type=lambda v: [int(s) for s in v.split(",")], default=[1024, 4096],
                        help="square weight sizes (sparse_linear)")
    parser.add_argument("--densities", type=lambda v: [float(s) for s in v.split(",")], default=[0.5, 0.2, 0.1, 0.05],
                        help="weight densities (sparse_linear)")
    parser.add_argument("--prune-densities", type=lambda v: [float(s) for s in v.split(",")], default=[0.5, 0.1],
                        help="mask densities (prune_regrow)")
    parser.add_argument("--prune-scale", type=int, default=1, help="divide ResNet-18's output channels (prune_regrow)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: GPU numbers come only from a GPU run (use --device cpu to smoke-test)")
    timer = make_timer(device)
    env = environment(device)
    env["copy_bandwidth_gb_per_s"] = copy_bandwidth(device, timer, args.copy_numel)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stamp = env["date"][:10]
    args.out.mkdir(parents=True, exist_ok=True)
    for op in args.ops:
        rows = BENCHMARKS[op](device, timer, args)
        for row in rows:
            base = next(r for r in rows if r.case == row.case and r.baseline)
            row.fraction_of_copy_bandwidth = row.gb_per_s / env["copy_bandwidth_gb_per_s"]
            if not row.baseline:
                row.speedup_vs_baseline = base.median_ms / row.median_ms
        stem = args.out / f"gpu_{op}_{slug}_{stamp}"
        stem.with_suffix(".json").write_text(
            json.dumps({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")
        with stem.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*env.keys(), *dataclasses.asdict(rows[0]).keys()])
            writer.writeheader()
            for r in rows:
                writer.writerow({**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in env.items()},
                                 **{k: json.dumps(v) if isinstance(v, dict) else v
                                    for k, v in dataclasses.asdict(r).items()}})
        print(f"{op} on {env['device']} (copy bandwidth {env['copy_bandwidth_gb_per_s']:.0f} GB/s) -> {stem}.json")
        print(f"{'case':<32} {'implementation':<16} {'median ms':>10} {'GB/s':>8} {'of copy':>8} {'TFLOP/s':>8} "
              f"{'speed-up':>9}")
        for r in rows:
            speed = f"{r.speedup_vs_baseline:.2f}x" if r.speedup_vs_baseline else "baseline"
            tflops = f"{r.shape['tflop_per_s']:.2f}" if "tflop_per_s" in r.shape else ""
            print(f"{r.case:<32} {r.implementation:<16} {r.median_ms:>10.3f} {r.gb_per_s:>8.1f} "
                  f"{r.fraction_of_copy_bandwidth:>8.0%} {tflops:>8} {speed:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
