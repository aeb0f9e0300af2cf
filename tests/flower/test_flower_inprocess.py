"""FedSpa's Flower strategy and client app, driven in one process: the same run as fedspa.train, sparse payloads
only, and faulty clients dropped without corrupting anything."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("flwr")

from fedspa import comm  # noqa: E402
from fedspa.config import ExperimentConfig  # noqa: E402
from fedspa.flower.server_app import run_strategy  # noqa: E402
from fedspa.train import read_checkpoint, run  # noqa: E402
from tests.flower.helpers import LocalGrid  # noqa: E402

TINY = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=4", "client_fraction=0.5",
        "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=3", "local_epochs=2", "batch_size=25",
        "progress=false", "measure_memory=false"]
KEYS = ("round", "sampled", "bytes_up", "bytes_down", "flops", "train_loss", "acc_pooled", "acc_mean",
        "acc_per_client")


def _config(*extra):
    return ExperimentConfig.load(None, TINY + list(extra))


@pytest.mark.parametrize("algorithm,extra", [("fedspa", "fedspa.regrowth=random"),
                                             ("fedspa", "fedspa.regrown_init=zero"), ("fedavg", "rounds=2"),
                                             ("ditto", "rounds=2"), ("sub_fedavg", "sub_fedavg.prune_rate=0.3"),
                                             ("fedspa", "fedspa.mask_scope=shared fedspa.regrowth=random"),
                                             ("fedspa", "fedspa.personal_head=true"),
                                             ("feddst", "feddst.readjust_interval=1")])
def test_flower_run_equals_the_single_process_run(tmp_path, algorithm, extra):
    config = _config(f"algorithm={algorithm}", *extra.split())
    strategy = run_strategy(LocalGrid(4), config, tmp_path / "flower", 60)
    reference = run(config, output_dir=tmp_path / "ref")
    assert [{k: h[k] for k in KEYS} for h in strategy.history] == [{k: h[k] for k in KEYS} for h in reference.history]
    assert all(not h["dropped"] for h in strategy.history)
    ref_state = read_checkpoint(tmp_path / "ref" / "checkpoint.pt")["server"]
    for name, value in strategy.server.global_model.state_dict().items():
        assert torch.equal(value, ref_state["global"][name])
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "run.log", "accuracy_vs_round.png",
                 "accuracy_vs_bytes.png"):
        assert (tmp_path / "flower" / name).is_file(), name
    assert "round 3" in (tmp_path / "flower" / "run.log").read_text() or config.rounds < 3
    if algorithm == "fedspa":
        assert json.loads((tmp_path / "flower" / "summary.json").read_text())["final_mask_density"] == \
            pytest.approx(0.3, abs=0.01)


def test_downlinks_are_sparse_payloads(tmp_path):
    config = _config("rounds=1")
    from fedspa.flower.strategy import FederatedStrategy

    strategy = FederatedStrategy(config)
    strategy.nodes = {k: 100 + k for k in range(4)}
    message, size = strategy._message(0, 0, "train")
    payload = message.content.array_records["arrays"]["payload"].numpy().tobytes()
    assert len(payload) == size
    entries = comm.decode(payload)
    sparse = [e for e in entries if e.kind in (comm.BITMAP, comm.INDICES)]
    assert len(sparse) == len(strategy.server.mask_shapes)
    dense_bytes = 4 * sum(p.numel() for p in strategy.server.global_model.parameters())
    assert size < 0.5 * dense_bytes


@pytest.mark.parametrize("fault,reason", [("nan", "non-finite value"), ("bad-index", "strictly increasing"),
                                          ("truncate", "truncated payload")])
def test_a_malformed_upload_is_dropped_and_the_round_completes(tmp_path, fault, reason):
    config = _config()
    grid = LocalGrid(4, node_config={k: {"fault": fault, "fault-round": 1} for k in range(4)})
    # round 1 samples clients 2 and 3 (see the equivalence test): both send garbage in round 1
    strategy = run_strategy(grid, config, tmp_path, 60)
    first = strategy.history[0]
    assert set(first["dropped"]) == {str(k) for k in first["sampled"]}
    assert all(reason in why for why in first["dropped"].values())
    assert first["aggregated"] == [] and first["bytes_up"] == 0
    for h in strategy.history[1:]:  # later rounds run normally, nothing was corrupted
        assert not h["dropped"] and math.isfinite(h["train_loss"])
    for p in strategy.server.global_model.parameters():
        assert torch.isfinite(p).all()


def test_silent_and_failing_clients_are_dropped(tmp_path):
    config = _config()
    strategy = run_strategy(LocalGrid(4, silent={2}, failing={3}), config, tmp_path, 60)
    first = strategy.history[0]
    assert first["dropped"] == {"2": "no reply within 60 s", "3": "error reply: ClientApp raised"}
    second = strategy.history[1]  # clients 1 and 3 sampled: 1 aggregates, 3 fails again
    assert second["aggregated"] == [1] and list(second["dropped"]) == ["3"]
    assert all(math.isfinite(h["acc_pooled"]) for h in strategy.history)


def test_after_a_drop_the_server_resends_the_mask(tmp_path):
    """A dropped client has moved its mask locally, the server never accepted it: the next downlink carries the
    server's positions again, and the client adopts them before any values are used."""
    from flwr.app import ArrayRecord

    from fedspa.flower.client_app import STATE
    from fedspa.flower.strategy import FederatedStrategy

    config = _config("rounds=3", "eval_every=3", "client_fraction=1.0")
    grid = LocalGrid(4, node_config={0: {"fault": "nan", "fault-round": 2}})
    strategy = FederatedStrategy(config, round_timeout=60)
    strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=60)  # stop before round 3: no evaluation yet
    assert list(strategy.history[1]["dropped"]) == ["0"]
    server = strategy.server
    assert server.server_knows_mask[0] is False

    def stored():
        record = grid.contexts[100].state.array_records[STATE]
        return {m: torch.from_numpy(record[f"mask.{m}"].numpy()) for m in server.mask_shapes}

    assert any(not torch.equal(stored()[m], server.masks[0][m]) for m in server.mask_shapes)
    message, _ = strategy._message(0, 2, "evaluate")
    assert any(e.kind in (comm.BITMAP, comm.INDICES) for e in
               comm.decode(message.content.array_records["arrays"]["payload"].numpy().tobytes()))
    grid.send_and_receive([message])
    assert all(torch.equal(stored()[m], server.masks[0][m]) for m in server.mask_shapes)


def test_a_client_node_holds_only_its_own_partition():
    """The ClientApp builds the client half from the config alone and keeps only its own samples."""
    from fedspa.data import federated_data
    from fedspa.flower.client_app import _resources

    config = _config()
    everyone = federated_data(config.data, config.clients)
    for k in range(config.clients):
        _, mine, _ = _resources(json.dumps(config.to_dict()), k)
        assert mine.num_train == everyone.clients[k].num_train
        assert torch.equal(mine.train_x, everyone.clients[k].train_x)
        assert torch.equal(mine.test_y, everyone.clients[k].test_y)


def test_bad_metrics_drop_the_client_not_the_server(tmp_path):
    """A reply whose metrics lack a field or carry a NaN is dropped with the reason; the round completes."""
    grid = LocalGrid(4, node_config={2: {"fault": "metrics-missing", "fault-round": 1},
                                     3: {"fault": "metrics-nan", "fault-round": 1}})
    strategy = run_strategy(grid, _config("rounds=1"), tmp_path, 60)
    first = strategy.history[0]
    assert first["sampled"] == [2, 3] and first["aggregated"] == []
    assert "'flops' is missing" in first["dropped"]["2"] and "'loss' must be finite" in first["dropped"]["3"]
    assert math.isfinite(first["acc_pooled"])


def test_an_evaluation_without_correct_or_total_is_left_out_not_a_crash(tmp_path):
    """A reply to evaluate that lacks its counts is left out of the round's accuracy, with the reason recorded."""
    grid = LocalGrid(4, node_config={1: {"fault": "eval-metrics-missing", "fault-round": 1}})
    strategy = run_strategy(grid, _config("rounds=1"), tmp_path, 60)
    first = strategy.history[0]
    assert "'correct' is missing" in first["eval_dropped"]["1"]
    assert math.isnan(first["acc_per_client"][1]) and math.isfinite(first["acc_pooled"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "'correct' is missing" in summary["eval_dropped"]["1"]["1"]
