"""The benchmark tooling runs end to end (tiny shapes): a broken script fails here, not on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fedspa_kernels as fk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env_updates):
    env = {**os.environ, **env_updates}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_cpu_benchmark_and_report(tmp_path):
    raw = tmp_path / "raw.json"
    _run(["-m", "pytest", "benchmarks/test_cpu_scatter_add.py", "-q", "-p", "no:cacheprovider",
          f"--benchmark-json={raw}"],
         {"FEDSPA_BENCH_N": "20000", "FEDSPA_BENCH_CLIENTS": "3", "FEDSPA_BENCH_ROUNDS": "2",
          "FEDSPA_BENCH_BASELINE_ROUNDS": "2", "FEDSPA_BENCH_PROBE_NUMEL": "1000000"})
    out, table = tmp_path / "summary.json", tmp_path / "table.md"
    _run(["benchmarks/report.py", str(raw), "--out", str(out), "--markdown", str(table),
          "--versions", json.dumps({"torch": "x"})], {})
    summary = json.loads(out.read_text())
    groups = {r["group"] for r in summary["rows"]}
    assert {"aggregate sum+count, sorted int32", "aggregate sum+count, shuffled int64",
            "masked average, sorted int32", "memory bandwidth"} <= groups
    ours = [r for r in summary["rows"] if r["implementation"] == "fedspa cpp"]
    assert len(ours) == 4 and all(r["speedup_vs_baseline"] > 0 and r["gb_per_s"] > 0 for r in ours)
    assert summary["measured_bandwidth_gb_per_s"] > 0
    assert "| masked average, sorted int32 | fedspa cpp |" in table.read_text()


def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    result = _run(["benchmarks/gpu_bench.py", "--device", "cpu", "--n", "3000", "--clients", "2",
                   "--copy-numel", "100000", "--batch", "16", "--sizes", "40", "--densities", "0.3",
                   "--prune-densities", "0.5", "--prune-scale", "16", "--out", str(tmp_path)], {})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 6 and all(f.endswith((".csv", ".json")) for f in files), files
    data = json.loads((tmp_path / next(f for f in files if f.startswith("gpu_scatter_add") and f.endswith(".json"))).read_text())
    assert data["environment"]["torch"] and data["environment"]["copy_bandwidth_gb_per_s"] > 0
    cases = {r["case"] for r in data["rows"]}
    assert cases == {"sorted int32", "sorted int64", "shuffled int64"}
    for case in cases:
        rows = [r for r in data["rows"] if r["case"] == case]
        assert sum(r["baseline"] for r in rows) == 1
        assert all(r["median_ms"] > 0 for r in rows)
        assert all(r["speedup_vs_baseline"] > 0 for r in rows if not r["baseline"])
    assert "speed-up" in result.stdout
    linear = json.loads((tmp_path / next(f for f in files if f.startswith("gpu_sparse_linear") and f.endswith(".json"))).read_text())
    cases = {r["case"] for r in linear["rows"]}
    assert cases == {f"{p} 40x40 d=0.3" for p in ("forward", "backward-input", "backward-weight")}
    for case in cases:
        names = {r["implementation"] for r in linear["rows"] if r["case"] == case}
        assert {"dense fp32", "torch.sparse", "fedspa cpp"} <= names
    assert all(r["shape"]["tflop_per_s"] > 0 for r in linear["rows"])
    prune = json.loads((tmp_path / next(f for f in files if f.startswith("gpu_prune_regrow") and f.endswith(".json"))).read_text())
    assert {r["implementation"] for r in prune["rows"]} >= {"torch.topk loop", "fedspa cpp"}
    assert all(r["median_ms"] > 0 for r in prune["rows"])


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_cpu_sparse_linear_benchmark_and_report(tmp_path):
    raw = tmp_path / "raw.json"
    _run(["-m", "pytest", "benchmarks/test_cpu_sparse_linear.py", "-q", "-p", "no:cacheprovider",
          f"--benchmark-json={raw}", "--benchmark-max-time=0.05", "--benchmark-min-rounds=2"],
         {"FEDSPA_BENCH_SIZES": "64", "FEDSPA_BENCH_DENSITIES": "0.2", "FEDSPA_BENCH_BATCH": "8"})
    out, table = tmp_path / "summary.json", tmp_path / "table.md"
    _run(["benchmarks/report.py", str(raw), "--out", str(out), "--markdown", str(table)], {})
    summary = json.loads(out.read_text())
    ours = {r["group"]: r for r in summary["rows"] if r["implementation"] == "fedspa cpp"}
    assert set(ours) == {f"{p} 64x64 d=0.2" for p in
                         ("forward", "backward-input", "backward-weight", "train step", "optimizer step")}
    for group in ("forward", "backward-input", "backward-weight"):
        row = ours[f"{group} 64x64 d=0.2"]
        assert row["speedup_vs_baseline"] > 0 and row["speedup_vs_peer"] > 0 and row["gflop_per_s"] > 0
    memory = ours["optimizer step 64x64 d=0.2"]["memory_bytes"]
    assert memory["total"] > 0 and memory["optimizer_state"] == memory["parameters"]
    assert "| memory (weights + grads + SGD momentum + index buffers) |" in table.read_text()


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_cpu_prune_regrow_benchmark(tmp_path):
    raw = tmp_path / "raw.json"
    _run(["-m", "pytest", "benchmarks/test_cpu_prune_regrow.py", "-q", "-p", "no:cacheprovider",
          f"--benchmark-json={raw}"], {"FEDSPA_BENCH_SCALE": "16", "FEDSPA_BENCH_DENSITIES": "0.5"})
    summary = json.loads(_run(["benchmarks/report.py", str(raw), "--out", str(tmp_path / "s.json")], {}) and
                         (tmp_path / "s.json").read_text())
    ours = [r for r in summary["rows"] if r["implementation"] == "fedspa cpp"]
    assert len(ours) == 1 and ours[0]["speedup_vs_baseline"] > 0 and ours[0]["speedup_vs_peer"] > 0
    assert summary["measured_bandwidth_gb_per_s"] > 0


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_cpu_sparse_conv_benchmark_and_report(tmp_path):
    raw = tmp_path / "raw.json"
    _run(["-m", "pytest", "benchmarks/test_cpu_sparse_conv.py", "-q", "-p", "no:cacheprovider", "-k", "cnn",
          f"--benchmark-json={raw}", "--benchmark-max-time=0.05", "--benchmark-min-rounds=2"],
         {"FEDSPA_BENCH_DENSITIES": "0.1", "FEDSPA_BENCH_BATCH": "2"})
    out, table = tmp_path / "summary.json", tmp_path / "table.md"
    _run(["benchmarks/report.py", str(raw), "--out", str(out), "--markdown", str(table)], {})
    summary = json.loads(out.read_text())
    assert summary["versions"]["torch"] and summary["versions"]["threads"] >= 1  # recorded without --versions
    rows = {(r["group"], r["implementation"]): r for r in summary["rows"]}
    forward = rows[("forward cnn conv2 32-64 14x14 k5 d=0.1", "fedspa cpp")]
    assert forward["speedup_vs_baseline"] > 0 and forward["speedup_vs_peer"] > 0 and forward["gflop_per_s"] > 0
    sparse = rows[("train step cnn conv2 32-64 14x14 k5 d=0.1", "fedspa cpp")]["memory_bytes"]["total"]
    dense = rows[("train step cnn conv2 32-64 14x14 k5 d=0.1", "masked dense")]["memory_bytes"]["total"]
    assert 0 < sparse < dense


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_cpu_peer_benchmark_and_report(tmp_path):
    """fedspa and dense always run; SparseProp's rows run where it is installed and skip cleanly where not."""
    raw = tmp_path / "raw.json"
    _run(["-m", "pytest", "benchmarks/test_cpu_peers.py", "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}",
          "--benchmark-max-time=0.05", "--benchmark-min-rounds=2"], {"FEDSPA_BENCH_TINY": "1"})
    out = tmp_path / "summary.json"
    _run(["benchmarks/report.py", str(raw), "--out", str(out)], {})
    summary = json.loads(out.read_text())
    ours = [r for r in summary["rows"] if r["implementation"] == "fedspa cpp"]
    assert len(ours) == 2 and all(r["speedup_vs_baseline"] > 0 and r["gflop_per_s"] > 0 for r in ours)
    assert summary["dense_flop_rate_gflop_per_s"] > 0
    try:
        import sparseprop  # noqa: F401
    except ImportError:
        return
    assert all(r["speedup_vs_peer"] > 0 for r in ours)


def test_client_step_benchmark_smoke(tmp_path):
    out = tmp_path / "client_step.json"
    result = _run(["benchmarks/client_step.py", str(out), "--models", "cnn", "--densities", "0.5", "--rounds", "1",
                   "--runs", "1"], {})
    rows = json.loads(out.read_text())["runs"][0]
    assert len(rows) == 1 and all(rows[0][f"{way}_s"] > 0 for way in ("fastest", "memory", "dense_masked"))
    # the plan each way ran: dense x mask runs no sparse layer, memory every one that fits
    assert rows[0]["dense_masked_sparse_layers"] == 0 and rows[0]["memory_sparse_layers"] >= 2
    assert "| cnn | 0.5 |" in result.stdout


def test_the_fidelity_runner_writes_each_stage_table_and_per_seed_files(tmp_path):
    env = {**os.environ, "FEDSPA_FIDELITY_RUNS": str(tmp_path / "runs"), "FEDSPA_FIDELITY_JOBS": "2",
           "FEDSPA_FIDELITY_RESULTS": str(tmp_path / "results"), "PATH": os.path.dirname(sys.executable) + os.pathsep
           + os.environ.get("PATH", "")}
    tiny = ["data.dataset=digits", "data.samples_per_client=100", "clients=3", "client_fraction=1.0",
            "model.name=mlp", "model.width=4", "rounds=1", "local_steps=2", "fedspa.density=0.3",
            "measure_memory=false"]
    result = subprocess.run(["bash", "benchmarks/fidelity.sh", "validation", "--", *tiny], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stage = tmp_path / "results" / "validation"
    table = (stage / "comparison.md").read_text()
    assert "pooled, on validation" in table
    assert "| fedspa+fedspa.regrowth=gradient+fedspa.regrown_init=zero+fedspa.aggregation=mean | 3 |" in table
    runs = sorted(p.name for p in stage.iterdir() if p.is_dir())
    assert len(runs) == 18 and "fedspa+fedspa.regrowth-random+fedspa.regrown_init-global_seed2" in runs
    assert sorted(f.name for f in (stage / runs[0]).iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    bad = subprocess.run(["bash", "benchmarks/fidelity.sh", "bogus"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "unknown stage bogus" in bad.stderr


def test_round_profile_smoke(tmp_path):
    out = tmp_path / "profile.json"
    tiny = ["data.dataset=digits", "data.samples_per_client=60", "clients=3", "client_fraction=0.67", "local_steps=2",
            "model.name=cnn", "model.width=2", "fedspa.density=0.3"]
    result = _run(["benchmarks/round_profile.py", str(out), *tiny, "--rounds", "1", "--runs", "1",
                   "--random-images", "1,12,12", "--samples", "16"], {})
    blob = json.loads(out.read_text())
    for variant in ("fedspa", "fedspa:dense_masked"):
        row = blob["runs"][variant][0]
        assert row["per_round_s"] > 0 and row["parts_s"]["train"] > 0 and row["parts_s"]["eval_forward"] > 0
        assert blob["train_ops_s"][variant]
    assert "| **whole round** |" in result.stdout
    again = _run(["benchmarks/round_profile.py", "--report", str(out)], {})
    assert "| **whole round** |" in again.stdout


def test_sparse_format_benchmark_smoke(tmp_path):
    for label in ("a", "b"):
        _run(["benchmarks/sparse_format.py", "measure", str(tmp_path / f"{label}.json"), "--label", label, "--small",
              "--repeats", "1"], {})
    result = _run(["benchmarks/sparse_format.py", "report", "--old", str(tmp_path / "a.json"), "--new",
                   str(tmp_path / "b.json")], {})
    assert "| linear 24->16 | 0.5 | 0.9 |" in result.stdout and "| conv 3-4 6x6 k3 s1, batch 4 | 0.3 |" in result.stdout


def test_masked_step_benchmark_smoke():
    result = _run(["benchmarks/masked_step.py", "--threads", "1", "--steps", "7"], {})
    row = [line for line in result.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(row) == 1 and all(float(cell) > 0 for cell in row[0].split("|")[2:5])


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_conv_batch_scaling_smoke():
    result = _run(["benchmarks/conv_batch_scaling.py", "--batches", "2,3"], {})
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and all(float(cell) > 0 for row in rows for cell in row.split("|")[2:5])


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_conv_kernel_times_smoke():
    result = _run(["benchmarks/conv_kernel_times.py", "--batch", "2", "--densities", "0.5"], {})
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| stage1 |", "| downsample |"))]
    assert len(rows) == 2 and all(float(cell) > 0 for row in rows for cell in row.split("|")[3:6])
    result = _run(["benchmarks/conv_kernel_times.py", "--batch", "2", "--densities", "0.5", "--shapes",
                   "stage2,stage3"], {})
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| stage2 |", "| stage3 |"))]
    assert len(rows) == 2 and all(float(cell) > 0 for row in rows for cell in row.split("|")[3:6])
    unknown = subprocess.run([sys.executable, "benchmarks/conv_kernel_times.py", "--shapes", "stage9"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert unknown.returncode == 2 and "stage9" in unknown.stderr


@pytest.mark.skipif(not fk.available_backends()["cpp"], reason="the cpp backend is not built")
def test_conv_layout_step_smoke():
    result = _run(["benchmarks/conv_layout_step.py", "--batch", "3", "--densities", "0.5", "--repeats", "2"], {})
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == ["conv", "conv+groupnorm+relu"] and all(r["ms"] > 0 for r in rows)


def test_layer_choice_smoke():
    result = _run(["benchmarks/layer_choice.py", "--conv", "4,6,5,2", "--batch", "3", "--density", "0.5",
                   "--threads", "1", "--runs", "2"], {})
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(r["choice"] in ("sparse", "masked") and r["ratio"] > 0 for r in rows)
