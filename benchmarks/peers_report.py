"""One table from several runs of ``benchmarks/test_cpu_peers.py`` (pytest-benchmark JSON files): per layer and
density the median train-step ms of dense (masked), fedspa and SparseProp, and fedspa's speed-up over each with its
range over the runs, fedspa's GFLOP/s and its share of the dense SGEMM rate measured in the same run.

    python benchmarks/peers_report.py run1.json run2.json run3.json --out results.json --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import _environment_versions, summarize


def combine(raws: list[dict]) -> dict:
    runs = [summarize(raw) for raw in raws]
    table = []
    for group in sorted({r["group"] for r in runs[0]["rows"] if r["group"].startswith("train step")}):
        def rows(role, group=group):
            return [next((r for r in run["rows"] if r["group"] == group and r["role"] == role), None) for run in runs]
        dense, ours, peer = rows("baseline"), rows("ours"), rows("peer")
        entry = {"layer": ours[0]["shape"], "density": ours[0]["density"],
                 "dense_ms": statistics.median(r["median_ms"] for r in dense),
                 "fedspa_ms": statistics.median(r["median_ms"] for r in ours),
                 "fedspa_vs_dense": [d["median_ms"] / o["median_ms"] for d, o in zip(dense, ours)],
                 "fedspa_gflop_per_s": statistics.median(r["gflop_per_s"] for r in ours),
                 "fedspa_share_of_sgemm": statistics.median(
                     o["gflop_per_s"] / run["dense_flop_rate_gflop_per_s"] for o, run in zip(ours, runs))}
        if all(peer):
            entry.update({"sparseprop": peer[0]["implementation"],
                          "sparseprop_ms": statistics.median(r["median_ms"] for r in peer),
                          "fedspa_vs_sparseprop": [p["median_ms"] / o["median_ms"] for p, o in zip(peer, ours)]})
        table.append(entry)
    versions = _environment_versions()  # the environment this is combined in: run it where the runs ran
    try:
        from importlib import metadata

        versions["sparseprop"] = metadata.version("sparseprop")
    except metadata.PackageNotFoundError:
        pass
    return {"runs": len(runs), "date": runs[0]["date"], "machine": runs[0]["machine"], "versions": versions,
            "threads": runs[0]["rows"][0].get("threads"),
            "sgemm_gflop_per_s": [run["dense_flop_rate_gflop_per_s"] for run in runs], "table": table}


def markdown(result: dict) -> str:
    def span(values):
        return f"{min(values):.2f}–{max(values):.2f}x"

    lines = [("| layer (train step) | d | dense ms | fedspa ms | SparseProp ms | fedspa vs dense | fedspa vs SparseProp "
              "| fedspa GFLOP/s (share of SGEMM) |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in result["table"]:
        peer = (f"{e['sparseprop_ms']:.2f} | {span(e['fedspa_vs_dense'])} | {span(e['fedspa_vs_sparseprop'])}"
                if "sparseprop_ms" in e else f"- | {span(e['fedspa_vs_dense'])} | -")
        lines.append(f"| {e['layer']} | {e['density']} | {e['dense_ms']:.2f} | {e['fedspa_ms']:.2f} | {peer} | "
                     f"{e['fedspa_gflop_per_s']:.1f} ({100 * e['fedspa_share_of_sgemm']:.0f}%) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    result = combine([json.loads(Path(p).read_text()) for p in args.runs])
    text = markdown(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
