"""What the pattern checks every native kernel runs cost, at the benchmark shapes (CPU, C++ kernels).

- SpMM and SDDMM check each row's columns inside their first pass (csrc/include/fedspa/csr_checks.h,
  FusedCsrCheck). To time that, this script JIT-builds two twins of those kernels with the package's compiler
  flags, one as shipped (op namespace ``fedspa_checked``) and one with the row check compiled out
  (FEDSPA_BENCHMARK_UNCHECKED, ``fedspa_unchecked``), and times both on the same inputs, calls interleaved in one
  process in alternating order: the cost is checked / unchecked - 1.
- For every op, the check alone (``fedspa::check_csr``: the same C++ code, as a separate pass over cold data, an
  upper bound for the fused check over rows already in L1) is timed against the op, interleaved likewise. The
  convolution kernels run exactly that pass before their work, so for them this is the cost.

Median of repeated calls per run, three runs.

    python benchmarks/pattern_check_cost.py benchmarks/results/pattern_check_cost_<date>.json [--repeats 31]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

import fedspa_kernels as fk

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
LINEAR = [(1024, 0.1), (1024, 0.5), (4096, 0.1), (4096, 0.5)]
CONV = [(64, 32, 0.1), (64, 32, 0.5), (256, 8, 0.1), (256, 8, 0.5)]  # ResNet-18 stages 1 and 3, batch 32, 3x3


_LIBRARIES = []  # keeps the twins' schemas alive


def build_twins() -> None:
    """torch.ops.fedspa_checked / fedspa_unchecked .{spmm, sddmm}: the C++ kernels with and without the fused row
    check, compiled alike (the flags of setup.py)."""
    for namespace, extra in (("fedspa_checked", []), ("fedspa_unchecked", ["-DFEDSPA_BENCHMARK_UNCHECKED"])):
        library = torch.library.Library(namespace, "DEF")
        library.define("spmm(Tensor values, Tensor crow_indices, Tensor col_indices, Tensor dense) -> Tensor")
        library.define("sddmm(Tensor a, Tensor bt, Tensor crow_indices, Tensor col_indices) -> Tensor")
        _LIBRARIES.append(library)
        load(namespace, [str(ROOT / "csrc" / "cpu" / "spmm.cpp"), str(ROOT / "csrc" / "cpu" / "sddmm.cpp")],
             extra_cflags=["-O3", "-fopenmp", "-fvisibility=hidden", f"-DFEDSPA_NAMESPACE={namespace}", *extra],
             extra_ldflags=["-fopenmp"], extra_include_paths=[str(ROOT / "csrc" / "include")],
             build_directory=tempfile.mkdtemp(prefix=namespace + "_"), is_python_module=False, verbose=False)


def _interleaved_medians(fns, repeats: int) -> list[float]:
    for fn in fns:
        fn()
        fn()
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))  # no position favoured
        for i in order:
            began = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - began)
    return [1e3 * statistics.median(t) for t in times]


def measure(repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    checked, unchecked = torch.ops.fedspa_checked, torch.ops.fedspa_unchecked
    for size, density in LINEAR:
        S = fk.SparseMatrix.from_dense(torch.randn(size, size, generator=g), torch.rand(size, size, generator=g) < density)
        x, dy = torch.randn(BATCH, size, generator=g), torch.randn(BATCH, size, generator=g)
        ccol, row_t, perm = S.transpose_pattern()  # the spmm kernel over the transposed order
        values_t = S.values.index_select(0, perm)
        csr, csc = (S.crow_indices, S.col_indices), (ccol, row_t)
        cases = (("spmm (forward)", "spmm", (S.values, *csr, x.t()), csr),
                 ("spmm transposed (input gradient)", "spmm", (values_t, *csc, dy.t()), csc),
                 ("sddmm (weight gradient)", "sddmm", (dy.t(), x.t(), *csr), csr))
        for label, op, args, (crow, col) in cases:
            with_ms, without_ms, check_ms = _interleaved_medians(
                [lambda: getattr(checked, op)(*args), lambda: getattr(unchecked, op)(*args),
                 lambda: torch.ops.fedspa.check_csr(crow, col, size)], repeats)
            rows.append({"op": label, "shape": f"{size}x{size}, batch {BATCH}", "density": density, "nnz": S.nnz,
                         "how": "fused", "op_ms": with_ms, "unchecked_ms": without_ms, "check_ms": check_ms,
                         "cost": with_ms / without_ms - 1, "check_share": check_ms / without_ms})
    for channels, hw, density in CONV:
        W = fk.SparseMatrix.from_dense(torch.randn(channels, channels * 9, generator=g),
                                       torch.rand(channels, channels * 9, generator=g) < density)
        x = torch.randn(32, channels, hw, hw, generator=g)
        op_ms, check_ms = _interleaved_medians(
            [lambda: fk.sparse_conv2d(x, W, 3, padding=1),
             lambda: torch.ops.fedspa.check_csr(W.crow_indices, W.col_indices, channels * 9)], repeats)
        share = check_ms / (op_ms - check_ms)
        rows.append({"op": "sparse_conv2d (forward)", "shape": f"{channels}-{channels} {hw}x{hw} k3, batch 32",
                     "density": density, "nnz": W.nnz, "how": "separate pass", "op_ms": op_ms, "check_ms": check_ms,
                     "cost": share, "check_share": share})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    build_twins()
    runs = [measure(args.repeats) for _ in range(args.runs)]
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "repeats": args.repeats,
            "method": __doc__.strip().splitlines()[0]}
    Path(args.output).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"| op | shape | density | check | op ms | check alone / op | with / without the check - 1 "
          f"(range over {args.runs} runs) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for i, row in enumerate(runs[0]):
        costs = [run[i]["cost"] for run in runs]
        shares = [run[i]["check_share"] for run in runs]
        op_ms = statistics.median(run[i]["op_ms"] for run in runs)
        ab = f"{100 * min(costs):+.1f} to {100 * max(costs):+.1f}%" if row["how"] == "fused" else "(the pass itself)"
        print(f"| {row['op']} | {row['shape']} | {row['density']} | {row['how']} | {op_ms:.2f} | "
              f"{100 * min(shares):.1f}–{100 * max(shares):.1f}% | {ab} |")


if __name__ == "__main__":
    main()
