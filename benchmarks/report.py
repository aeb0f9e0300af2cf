"""Turns a pytest-benchmark JSON file into a results file and a markdown table.

    python benchmarks/report.py bench.json [--out benchmarks/results/cpu_scatter_add.json] [--markdown table.md]

For each benchmark group: the median time of every implementation; its effective bandwidth (the minimum bytes
it must move over the median time) or its useful FLOP rate, when the benchmark records ``bytes`` or
``flops``; and the speed-up of each implementation over the group's baseline (role "baseline") and over its
peer library (role "peer"). A memory-bandwidth probe of the same run ("probe") is the limit bandwidths are
compared with; the fastest dense baseline's FLOP rate is the limit FLOP rates are compared with. Recorded
``memory_bytes`` are tabulated too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _environment_versions() -> dict:
    """torch / triton / fedspa versions and torch's thread count of the environment running this script."""
    from importlib import metadata

    versions = {}
    for package in ("torch", "triton", "fedspa"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        versions["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return versions


def summarize(raw: dict) -> dict:
    """Groups, medians, GB/s and ratios from pytest-benchmark's JSON."""
    rows = []
    for bench in raw["benchmarks"]:
        extra = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        role = extra.get("role") or ("probe" if extra.get("probe") else "baseline" if extra.get("baseline") else "ours")
        row = {
            "group": bench["group"],
            "implementation": extra.get("implementation", bench["name"]),
            "role": role,
            "baseline": role == "baseline",
            "probe": role == "probe",
            "median_ms": median * 1e3,
            "min_ms": bench["stats"]["min"] * 1e3,
            "rounds": bench["stats"]["rounds"],
            "bytes": extra.get("bytes"),
            "gb_per_s": (extra["bytes"] / median / 1e9) if extra.get("bytes") else None,
            "gflop_per_s": (extra["flops"] / median / 1e9) if extra.get("flops") else None,
        }
        row.update({k: v for k, v in extra.items() if k not in row and k not in ("implementation",)})
        rows.append(row)
    probes = [r for r in rows if r["probe"] and r["gb_per_s"]]
    peak = max((r["gb_per_s"] for r in probes), default=None)
    dense_rates = [r["gflop_per_s"] for r in rows if r["baseline"] and r["gflop_per_s"] and r.get("density") == 1.0]
    flop_peak = max(dense_rates, default=None)
    for group in {r["group"] for r in rows}:
        members = [r for r in rows if r["group"] == group]
        baseline = next((r for r in members if r["baseline"]), None)
        peer = next((r for r in members if r["role"] == "peer"), None)
        for r in members:
            if baseline is not None and r is not baseline:
                r["speedup_vs_baseline"] = baseline["median_ms"] / r["median_ms"]
            if peer is not None and r["role"] == "ours":
                r["speedup_vs_peer"] = peer["median_ms"] / r["median_ms"]
            if peak and r["gb_per_s"] and not r["probe"]:
                r["fraction_of_measured_bandwidth"] = r["gb_per_s"] / peak
    machine = raw.get("machine_info", {})
    return {
        "date": raw.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": machine.get("cpu", {}).get("count"),
            "python": machine.get("python_version"),
            "platform": platform.platform(),
        },
        "versions": raw.get("versions", {}),
        "measured_bandwidth_gb_per_s": peak,
        "dense_flop_rate_gflop_per_s": flop_peak,
        "rows": sorted(rows, key=lambda r: (r["group"], not r["baseline"], r["implementation"])),
    }


def markdown(summary: dict) -> str:
    m = summary["machine"]
    probe = summary["measured_bandwidth_gb_per_s"]
    lines = [
        f"Measured {summary['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
        + (f"; memory bandwidth probe: {probe:.1f} GB/s." if probe else "."),
        "",
        "| group | implementation | median ms | GB/s | GFLOP/s | vs baseline | vs peer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["rows"]:
        if r["probe"]:
            continue
        speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ("baseline" if r["baseline"] else "")
        peer = f"{r['speedup_vs_peer']:.2f}x" if "speedup_vs_peer" in r else ("peer" if r["role"] == "peer" else "")
        gbs = f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else ""
        gflops = f"{r['gflop_per_s']:.1f}" if r["gflop_per_s"] else ""
        lines.append(f"| {r['group']} | {r['implementation']} | {r['median_ms']:.3f} | {gbs} | {gflops} | {speed} | {peer} |")
    memory = [r for r in summary["rows"] if r.get("memory_bytes")]
    if memory:
        lines += ["", "| memory (weights + grads + SGD momentum + index buffers) | implementation | MB |",
                  "| --- | --- | ---: |"]
        for r in memory:
            lines.append(f"| {r['group'].replace('optimizer step ', '')} | {r['implementation']} | "
                         f"{r['memory_bytes']['total'] / 1e6:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_json", type=Path)
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--versions", help="JSON object of library versions to record (default: this environment's "
                        "torch, triton, fedspa and thread count)")
    args = parser.parse_args(argv)
    raw = json.loads(args.benchmark_json.read_text())
    raw["versions"] = json.loads(args.versions) if args.versions is not None else _environment_versions()
    summary = summarize(raw)
    table = markdown(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
