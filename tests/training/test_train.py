"""fedspa.train end to end: it learns, sparse == dense-masked math, resume equals an uninterrupted run, bad
checkpoints are refused, and the costs it reports are the ones FedSpa claims to save."""

from __future__ import annotations

import json

import pytest
import torch

from fedspa.config import ExperimentConfig
from fedspa.train import CheckpointError, load_checkpoint, read_checkpoint, run
from tests.helpers import FAST_SGD

TINY = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=4", "client_fraction=1.0",
        "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=8", "local_epochs=4", "batch_size=25",
        "progress=false", "fedspa.sparse_policy=memory"] + FAST_SGD  # sparse layers wherever they fit
TIMING = {"train_seconds", "eval_seconds", "peak_memory"}


def _config(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.load(None, TINY + list(overrides))


def _semantic(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fedspa_learns_well_above_chance(tmp_path, model):
    result = run(_config(f"model.name={model}"), output_dir=tmp_path)
    s = result.summary
    assert s["final_acc_pooled"] > 0.6, s  # 10 classes: chance is 0.1
    assert s["best_acc_pooled"] >= s["final_acc_pooled"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    for name in ("config.yaml", "run.json", "partition.json", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint.pt",
                 "label_distribution.png", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len(rows[-1]["acc_per_client"]) == 4
    assert all(r["peak_memory"] > 0 and r["bytes_up"] > 0 and r["flops"] > 0 for r in rows)


def test_sparse_and_dense_masked_execution_compute_the_same_thing(tmp_path):
    """Same masks, same math; only the execution differs: the sparse one costs fewer FLOPs and less memory."""
    sparse = run(_config("rounds=3"), output_dir=tmp_path / "sparse")
    dense = run(_config("rounds=3", "fedspa.execution=dense_masked"), output_dir=tmp_path / "dense")
    for a, b in zip(sparse.history, dense.history):
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["acc_pooled"] == pytest.approx(b["acc_pooled"], abs=2.5e-3)  # at most a borderline sample
        assert a["flops"] < 0.5 * b["flops"]
    assert sparse.summary["peak_client_memory"] < dense.summary["peak_client_memory"]
    checkpoints = [read_checkpoint(p / "checkpoint.pt")["server"] for p in
                   (tmp_path / "sparse", tmp_path / "dense")]
    for name, value in checkpoints[0]["global"].items():
        torch.testing.assert_close(value, checkpoints[1]["global"][name], rtol=1e-3, atol=1e-4)
    assert all(torch.equal(checkpoints[0]["masks"][k][n], checkpoints[1]["masks"][k][n])
               for k in range(4) for n in checkpoints[0]["masks"][k])


def test_fedspa_masks_keep_their_density_and_evolve(tmp_path):
    config = _config("rounds=3")
    run(config, output_dir=tmp_path)
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    from fedspa.train import federation

    initial = federation(config).server  # the masks every client starts from
    for k in range(4):
        for name, mask in state["server"]["masks"][k].items():
            assert int(mask.sum()) == int(initial.masks[k][name].sum())  # nnz per layer unchanged
            assert torch.equal(state["clients"][k][f"mask.{name}"], mask)  # the client holds what the server has
        changed = sum(int((state["server"]["masks"][k][n] != initial.masks[k][n]).sum()) for n in initial.masks[k])
        assert changed > 0
    masks = state["server"]["masks"]
    assert not torch.equal(masks[0]["net.1.weight"], masks[1]["net.1.weight"])  # personalized


def test_communication_and_flops_scale_with_density(tmp_path):
    fedspa = run(_config("rounds=2", "measure_memory=false"), output_dir=tmp_path / "fedspa").summary
    fedavg = run(_config("rounds=2", "algorithm=fedavg", "measure_memory=false"), output_dir=tmp_path / "fedavg").summary
    assert fedspa["bytes_up"] < 0.5 * fedavg["bytes_up"]
    assert fedspa["bytes_down"] < 0.5 * fedavg["bytes_down"]
    assert fedspa["training_flops"] < 0.5 * fedavg["training_flops"]
    assert fedspa["peak_client_memory"] is None


@pytest.mark.parametrize("algorithm", ["fedspa", "fedavg"])
def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path, algorithm):
    config = _config("rounds=4", f"algorithm={algorithm}", "fedspa.regrowth=random", "eval_every=2")
    full = run(config, output_dir=tmp_path / "full")
    killed = run(config, output_dir=tmp_path / "resumed", stop_after=2)
    assert len(killed.history) == 2
    resumed = run(config, output_dir=tmp_path / "resumed", resume=True)
    assert _semantic(resumed.history) == _semantic(full.history)
    a = read_checkpoint(tmp_path / "full" / "checkpoint.pt")["server"]
    b = read_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["server"]
    assert all(torch.equal(a["global"][n], b["global"][n]) for n in a["global"])
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4]


def test_bad_checkpoints_are_refused(tmp_path):
    config = _config("rounds=1", "measure_memory=false")
    run(config, output_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    other = _config("rounds=1", "fedspa.density=0.5")
    with pytest.raises(CheckpointError, match="different experiment.*fedspa.density: 0.3 in the checkpoint, 0.5 now"):
        run(other, output_dir=tmp_path, resume=True)
    assert load_checkpoint(path, _config("rounds=1", "progress=true", "measure_memory=false"))  # cosmetic fields
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fedspa checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt", config)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        run(config, output_dir=tmp_path, resume=True)


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSPA_DATA", raising=False)
    from fedspa.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="cifar10: expected the python pickles"):
        run(_config("data.dataset=cifar10", f"data.root={tmp_path}", "model.name=cnn"), output_dir=tmp_path / "out")


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    config = _config("rounds=2", "measure_memory=false")
    run(config, output_dir=tmp_path, stop_after=1)
    path = tmp_path / "checkpoint.pt"
    state = read_checkpoint(path)
    del state["config"]["fedspa"]["sparse_max_density"]  # as written before the field existed
    torch.save(state, path)
    assert load_checkpoint(path, config)["round"] == 1
    with pytest.raises(CheckpointError, match="fedspa.sparse_max_density: 0.5 in the checkpoint, 0.2 now"):
        load_checkpoint(path, _config("rounds=2", "measure_memory=false", "fedspa.sparse_max_density=0.2"))


def test_the_run_folder_has_a_log_of_every_round(tmp_path, caplog):
    run(_config("rounds=2", "measure_memory=false"), output_dir=tmp_path)
    text = (tmp_path / "run.log").read_text()
    assert "round 1: train_loss" in text and "round 2: train_loss" in text and "run finished" in text
    assert "layer execution measured" not in text or "INFO" in text


def test_tensorboard_logs_the_per_round_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(_config("rounds=2", "measure_memory=false", "tensorboard=true"), output_dir=tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag in ("train_loss", "acc_pooled", "bytes_up", "mask_density"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([h[tag] for h in result.history], rel=1e-6)


def test_checkpoints_store_masks_as_bits(tmp_path):
    """A client's mask costs numel / 8 bytes in checkpoint.pt (packed), not numel (bool); resuming unpacks it."""
    config = _config("rounds=2", "measure_memory=false")
    run(config, output_dir=tmp_path, stop_after=1)
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    unpacked = read_checkpoint(tmp_path / "checkpoint.pt")
    for k in range(4):
        for name, packed in raw["server"]["masks"][k].items():
            mask = unpacked["server"]["masks"][k][name]
            assert mask.dtype == torch.bool and list(mask.shape) == packed["shape"]
            assert packed["packed_bool"].dtype == torch.uint8
            assert packed["packed_bool"].numel() == (mask.numel() + 7) // 8
    mask_bits = sum(p["packed_bool"].numel() for masks in raw["server"]["masks"] for p in masks.values())
    mask_numel = sum(m.numel() for masks in unpacked["server"]["masks"] for m in masks.values())
    assert mask_bits * 8 < mask_numel + 8 * 4 * len(raw["server"]["masks"][0])
    resumed = run(config, output_dir=tmp_path, resume=True)
    assert len(resumed.history) == 2


@pytest.mark.parametrize("damage,message", [("short", "needs"), ("stray", "sets bits past its end"),
                                            ("shape", "has the shape")])
def test_a_damaged_packed_mask_is_a_checkpoint_error(tmp_path, damage, message):
    config = _config("rounds=2", "measure_memory=false")
    run(config, output_dir=tmp_path, stop_after=1)
    path = tmp_path / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    packed = next(iter(raw["server"]["masks"][0].values()))
    if damage == "short":
        packed["packed_bool"] = packed["packed_bool"][:-1]
    elif damage == "stray":  # 3 elements fewer in as many bytes: 3 bits of padding, the last one set
        packed["shape"] = [torch.Size(packed["shape"]).numel() - 3]
        assert packed["shape"][0] % 8 == 5
        packed["packed_bool"][-1] |= 1
    else:
        packed["shape"] = [-1]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=message):
        run(config, output_dir=tmp_path, resume=True)
