"""The `fedspa` command: train, compare, and clear errors."""

from __future__ import annotations

import csv
import json

import pytest

from fedspa.cli import main
from fedspa.compare import Variant, bytes_to_accuracy, default_target, rounds_to_accuracy

TINY = ["data.dataset=digits", "data.samples_per_client=200", "clients=3", "client_fraction=1.0", "model.name=mlp",
        "model.width=4", "rounds=2", "local_steps=3", "fedspa.density=0.3", "measure_memory=false", "progress=false"]


def test_train_prints_a_summary_and_writes_the_run(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "personalized accuracy (pooled)" in out and "communicated: up" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["algorithm"] == "fedspa"
    assert main(["train", "--output", str(tmp_path / "run"), "--resume", *TINY]) == 0  # already complete


def test_compare_writes_one_table_for_every_variant_and_seed(tmp_path, capsys):
    assert main(["compare", "--output", str(tmp_path), "--variants", "fedspa,fedspa:dense_masked,fedavg",
                 "--seeds", "0,1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| fedspa:dense_masked | 2 |" in out
    with (tmp_path / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["fedspa", "fedspa:dense_masked", "fedavg"]
    assert all(r["seeds"] == "2" for r in rows)
    assert float(rows[0]["bytes_total"]) < float(rows[2]["bytes_total"])
    for name in ("comparison.md", "comparison.json", "accuracy_vs_round.png", "accuracy_vs_bytes.png",
                 "accuracy_vs_flops.png"):
        assert (tmp_path / name).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "fedavg_seed0", "fedavg_seed1", "fedspa_dense_masked_seed0", "fedspa_dense_masked_seed1", "fedspa_seed0",
        "fedspa_seed1"]
    meta = json.loads((tmp_path / "comparison.json").read_text())
    assert meta["seeds"] == [0, 1] and "torch" in meta["machine"]


def test_bytes_to_accuracy():
    history = [{"round": 1, "bytes_up": 10, "bytes_down": 5, "acc_pooled": 0.2},
               {"round": 2, "bytes_up": 10, "bytes_down": 5},
               {"round": 3, "bytes_up": 10, "bytes_down": 5, "acc_pooled": 0.6}]
    assert bytes_to_accuracy(history, 0.5) == 45
    assert bytes_to_accuracy(history, 0.1) == 15
    assert bytes_to_accuracy(history, 0.9) is None


@pytest.mark.parametrize("args,message", [
    (["train", "fedspa.density=2"], r"fedspa.density must lie in \(0, 1\]"),
    (["train", "data.dataset=imagenet"], "data.dataset must be one of"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["compare", "--variants", "fedavg:dense_masked"], "fedavg has no execution mode"),
    (["compare", "--variants", "fedbogus"], "unknown algorithm 'fedbogus'"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_missing_dataset_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDSPA_DATA", raising=False)
    assert main(["train", "--output", str(tmp_path), "data.dataset=cifar10", f"data.root={tmp_path}"]) == 2
    assert "cifar10: expected the python pickles" in capsys.readouterr().err


def test_variant_parsing():
    assert Variant.parse("fedspa:dense_masked").label == "fedspa:dense_masked"
    assert Variant.parse(" fedavg ").label == "fedavg"
    with pytest.raises(ValueError, match="unknown execution 'fast'"):
        Variant.parse("fedspa:fast")


def test_a_variant_carries_its_own_overrides():
    from fedspa.config import ExperimentConfig

    base = ExperimentConfig.load(None, ["local_epochs=2"])
    variant = Variant.parse("fedspa:dense_masked+fedspa.regrowth=gradient+fedspa.density=0.3")
    assert variant.label == "fedspa:dense_masked+fedspa.regrowth=gradient+fedspa.density=0.3"
    config = variant.configure(base, 4)
    assert (config.fedspa.regrowth, config.fedspa.density, config.fedspa.execution, config.local_epochs,
            config.seed) == ("gradient", 0.3, "dense_masked", 2, 4)
    assert config.name == "fedspa_dense_masked+fedspa.regrowth-gradient+fedspa.density-0.3_seed4"
    assert base.fedspa.regrowth == "random" and base.fedspa.density == 0.5  # the shared config is untouched
    with pytest.raises(ValueError, match="seed is not a per-variant override"):
        Variant.parse("fedspa+seed=3")
    with pytest.raises(ValueError, match="fedspa.execution is not a per-variant override"):
        Variant.parse("fedspa+fedspa.execution=dense_masked")
    with pytest.raises(ValueError, match="must look like key=value"):
        Variant.parse("fedspa+gradient")
    with pytest.raises(ValueError, match=r"variant 'fedspa\+fedspa.regrowth=rigl': fedspa.regrowth must be one of"):
        Variant.parse("fedspa+fedspa.regrowth=rigl").configure(base, 0)
    with pytest.raises(ValueError, match="too long to name its run folders"):
        Variant.parse("fedspa" + "+fedspa.density=0.3" * 6).configure(base, 0)


def test_compare_runs_an_ablation_from_overrides(tmp_path, capsys):
    assert main(["compare", "--output", str(tmp_path), "--variants", "fedspa,fedspa+fedspa.regrowth=gradient",
                 *TINY]) == 0
    assert "| fedspa+fedspa.regrowth=gradient | 1 |" in capsys.readouterr().out
    import yaml

    saved = yaml.safe_load((tmp_path / "fedspa+fedspa.regrowth-gradient_seed0" / "config.yaml").read_text())
    plain = yaml.safe_load((tmp_path / "fedspa_seed0" / "config.yaml").read_text())
    assert (saved["fedspa"]["regrowth"], plain["fedspa"]["regrowth"]) == ("gradient", "random")


def test_all_expands_to_every_algorithm():
    from fedspa.algorithms import names
    from fedspa.compare import expand_variants

    variants = expand_variants(["fedavg", "all"])
    # every algorithm, plus the dense-masked twins of the three sparse ones
    assert variants[0] == "fedavg" and len(variants) == len(set(variants)) == len(names()) + 3
    assert {Variant.parse(v).algorithm for v in variants} == set(names())
    assert {"fedspa:dense_masked", "sub_fedavg:dense_masked", "feddst:dense_masked"} <= set(variants)


def test_the_help_example_runs_as_written(tmp_path, capsys):
    from fedspa.cli import HELP_EXAMPLE

    overrides = [o for o in HELP_EXAMPLE.split() if not o.startswith("rounds=")]
    assert main(["train", "--output", str(tmp_path / "run"), *overrides, "rounds=1", "progress=false",
                 "measure_memory=false"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1


def test_too_few_samples_says_what_would_fit(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), "data.dataset=digits", "rounds=1"]) == 2
    err = capsys.readouterr().err
    assert "needs 4000 samples, the dataset has 1797" in err and "data.samples_per_client=179 or less" in err
    assert "Traceback" not in err


def test_the_printed_round_time_is_the_median(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), *TINY, "rounds=3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"{summary['median_seconds_per_round']:.2f} s / round (median of 3;" in out


def test_the_default_target_is_a_whole_percent_most_variants_reach():
    assert default_target([0.90, 0.80, 0.245]) == 0.72  # 0.9 x the median 0.80, not 0.95 x the worst (0.233)
    assert default_target([0.9137]) == 0.82
    history = [{"round": 1, "bytes_up": 10, "bytes_down": 5, "acc_pooled": 0.5},
               {"round": 2, "bytes_up": 10, "bytes_down": 5},
               {"round": 3, "bytes_up": 10, "bytes_down": 5, "acc_pooled": 0.8}]
    assert rounds_to_accuracy(history, 0.7) == 3 and bytes_to_accuracy(history, 0.7) == 45
    assert rounds_to_accuracy(history, 0.9) is None


def test_the_comparison_table_names_the_target_in_percent(tmp_path, capsys):
    assert main(["compare", "--output", str(tmp_path), "--variants", "fedavg,local", "--target", "0.99",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "rounds to 99% | MB to 99%" in out and "- (0/1 seeds)" in out


def test_overrides_may_follow_options_and_resume_reads_the_runs_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    rest = [t for t in TINY if not t.startswith(("rounds=", "fedspa.density="))]
    assert main(["train", "rounds=1", "--output", out, *rest, "fedspa.density=0.2"]) == 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["rounds"] == 1 and saved["density"] == 0.2
    # no --config: the run's own config.yaml (density 0.2), not the defaults (which a checkpoint would refuse)
    assert main(["train", "--output", out, "--resume", "rounds=2"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 2
    with pytest.raises(SystemExit):
        main(["train", "--output", out, "--bogus"])
