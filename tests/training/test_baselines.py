"""Every baseline learns on a tiny config, communicates what it should, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from fedspa.algorithms import names
from fedspa.config import ExperimentConfig
from fedspa.train import read_checkpoint, run
from tests.helpers import FAST_SGD

TINY = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=4", "client_fraction=1.0",
        "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=6", "local_epochs=4", "batch_size=25",
        "measure_memory=false", "progress=false", "sub_fedavg.prune_rate=0.2",
        "fedspa.sparse_policy=memory"] + FAST_SGD  # sparse layers wherever they fit: what these tests exercise


def _run(tmp_path, algorithm, *extra):
    return run(ExperimentConfig.load(None, TINY + [f"algorithm={algorithm}", *extra]),
               output_dir=tmp_path / algorithm)


@pytest.mark.parametrize("algorithm", names())
def test_every_algorithm_learns(tmp_path, algorithm):
    summary = _run(tmp_path, algorithm).summary
    assert summary["final_acc_pooled"] > 0.6, summary  # chance: 0.1
    assert summary["algorithm"] == algorithm


def test_payload_sizes_follow_what_each_method_shares(tmp_path):
    sizes = {a: _run(tmp_path, a, "rounds=1").summary for a in ("fedavg", "fedper", "lg_fedavg", "local", "ditto")}
    assert sizes["local"]["bytes_up"] == sizes["local"]["bytes_down"] == 0
    assert sizes["lg_fedavg"]["bytes_up"] < sizes["fedper"]["bytes_up"] < sizes["fedavg"]["bytes_up"]
    assert sizes["ditto"]["bytes_up"] == sizes["fedavg"]["bytes_up"]
    assert sizes["ditto"]["training_flops"] == pytest.approx(2 * sizes["fedavg"]["training_flops"])
    # the MLP head (last Linear, 32 -> 10 with bias) is exactly what LG-FedAvg sends: 4 clients x (magic and
    # count, two tensor headers of 11 bytes, 330 float32 values)
    assert sizes["lg_fedavg"]["bytes_up"] == 4 * (8 + 2 * 11 + 4 * (32 * 10 + 10))

def test_sub_fedavg_prunes_down_to_its_target_and_stops(tmp_path):
    result = _run(tmp_path, "sub_fedavg", "rounds=8", "sub_fedavg.prune_rate=0.3")
    state = read_checkpoint(tmp_path / "sub_fedavg" / "checkpoint.pt")["server"]
    total = sum(m.numel() for m in state["masks"][0].values())
    nnz = sum(int(m.sum()) for m in state["masks"][0].values())
    assert nnz / total == pytest.approx(0.3, abs=0.01)  # reached the target density, never below
    ups = [h["bytes_up"] for h in result.history]
    assert ups[-1] < 0.5 * ups[0]  # the payload shrank with the mask


def test_sub_fedavg_schedule_reaches_the_target_density_by_prune_until(tmp_path):
    """The default schedule: every client sampled at or after round prune_until * rounds holds exactly the target
    nnz per tensor, however few times it was sampled before; the summary reports the clients' final density."""
    result = _run(tmp_path, "sub_fedavg", "rounds=8", "client_fraction=0.5", "sub_fedavg.prune_rate=null",
                  "sub_fedavg.prune_until=0.5")
    from fedspa.train import federation

    server = federation(ExperimentConfig.load(None, TINY + ["algorithm=sub_fedavg"])).server
    state = read_checkpoint(tmp_path / "sub_fedavg" / "checkpoint.pt")["server"]
    late = {k for h in result.history[3:] for k in h["sampled"]}  # sampled in rounds 4..8 (0-based 3..7)
    assert late
    for k in range(4):
        for name, mask in state["masks"][k].items():
            if k in late:
                assert int(mask.sum()) == server.targets[name], (k, name)
            else:
                assert int(mask.sum()) >= server.targets[name]
    densities = [sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
                 for masks in state["masks"]]
    assert result.summary["final_mask_density"] == pytest.approx(sum(densities) / 4)
    assert [h["mask_density"] for h in result.history] == sorted((h["mask_density"] for h in result.history),
                                                                 reverse=True)


def test_scheduled_nnz_falls_geometrically_to_the_target_and_stays():
    from fedspa.algorithms.sub_fedavg import scheduled_nnz

    numel, target, rounds = 1000, 100, 10
    nnz, seen = numel, []
    for t in range(rounds):
        nnz = scheduled_nnz(nnz, numel, target, t, rounds, 0.5)
        seen.append(nnz)
    assert seen[:5] == [631, 399, 252, 159, 100] and seen[5:] == [100] * 5  # 0.1 ** ((t + 1) / 5)
    assert scheduled_nnz(700, numel, target, 0, rounds, 0.5) == 631  # a client sampled late catches up at once
    assert scheduled_nnz(500, numel, target, 0, rounds, 0.5) == 500  # and never grows
    assert scheduled_nnz(50, 50, 50, 3, rounds, 0.5) == 50  # a dense tensor stays dense


@pytest.mark.parametrize("algorithm", ["ditto", "fedper", "sub_fedavg", "fedavg_ft", "fedrep"])
def test_resume_is_exact(tmp_path, algorithm):
    config = ExperimentConfig.load(None, TINY + [f"algorithm={algorithm}", "rounds=3", "client_fraction=0.5"])
    full = run(config, output_dir=tmp_path / "full")
    run(config, output_dir=tmp_path / "resumed", stop_after=1)
    resumed = run(config, output_dir=tmp_path / "resumed", resume=True)
    drop = {"train_seconds", "eval_seconds", "peak_memory"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in full.history]


def test_layers_denser_than_the_break_even_run_dense_masked(tmp_path):
    """Sub-FedAvg starts dense: its layers run as dense weights x mask until pruned below sparse_max_density,
    and the result does not depend on that choice (only the cost does)."""
    from fedspa.nn import apply_masks
    from fedspa.models import MLP

    model = MLP((1, 8, 8), 10, 8)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(apply_masks(model, masks, sparse=True, sparse_max_density=0.5).values()) == {"dense"}  # all ones
    masks = {n: torch.rand(m.shape) < (0.8 if n == "net.1.weight" else 0.2) for n, m in masks.items()}
    plan = apply_masks(MLP((1, 8, 8), 10, 8), masks, sparse=True, sparse_max_density=0.5)
    assert plan == {"net.1.weight": "masked", "net.3.weight": "sparse", "net.5.weight": "sparse"}
    a = _run(tmp_path / "a", "sub_fedavg", "rounds=3", "fedspa.sparse_max_density=1.0").history
    b = _run(tmp_path / "b", "sub_fedavg", "rounds=3", "fedspa.sparse_max_density=0.0").history
    assert [h["train_loss"] for h in a] == pytest.approx([h["train_loss"] for h in b], rel=1e-4)
    assert [h["bytes_up"] for h in a] == [h["bytes_up"] for h in b]
