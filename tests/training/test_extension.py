"""fedspa.train as a research tool: a federation from plain tensors, a user model, loss and algorithm registered
through the public API only; algorithm sections in the config; the run folder records what was really used."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fedspa.algorithms import (Client, Server, TrainMetrics, Upload, decode_dense, encode_dense, load_state, names,
                               register, unregister)
from fedspa.config import ExperimentConfig
from fedspa.data import FederatedData
from fedspa.train import CheckpointError, run


def _blobs(clients: int = 3, per_client: int = 120, seed: int = 0) -> FederatedData:
    """Three Gaussian blobs in 2-D; each client sees its own mix of the classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    train, test = [], []
    for k in range(clients):
        weights = torch.full((3,), 0.1)
        weights[k % 3] = 0.8
        y = torch.multinomial(weights, per_client, replacement=True, generator=g)
        x = centres[y] + torch.randn(per_client, 2, generator=g)
        train.append((x[:100], y[:100]))
        test.append((x[100:], y[100:]))
    return FederatedData.from_tensors(train, test)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ---------------------------------------------------------------------------------------------- a user algorithm
@dataclass
class TrimmedMeanConfig:
    trim: int = 1  # clients dropped from each end, per coordinate, before averaging

    def validate(self) -> None:
        if self.trim < 0:
            raise ValueError(f"trim must be >= 0, got {self.trim}")


class TrimmedMeanServer(Server):
    """Coordinate-wise trimmed mean of the clients' models (Yin et al., ICML 2018)."""

    def downlink(self, client: int, round_index: int) -> bytes:
        return encode_dense(self.global_model.state_dict(), self.models.names)

    def receive(self, upload: Upload) -> dict[str, torch.Tensor]:
        return decode_dense(upload.payload, self.models.names, self.models.shapes, self.device)

    def aggregate(self, received: list[dict[str, torch.Tensor]], round_index: int) -> None:
        trim = min(self.config.trimmed_mean_test.trim, (len(received) - 1) // 2)
        merged = {}
        for name in self.models.names:
            stacked = torch.stack([r[name] for r in received]).sort(dim=0).values
            merged[name] = stacked[trim:len(received) - trim].mean(0)
        load_state(self.global_model, merged)


class TrimmedMeanClient(Client):
    def _model(self, downlink: bytes) -> nn.Module:
        model = self.models.make(self.device)
        load_state(model, decode_dense(downlink, self.models.names, self.models.shapes, self.device))
        return model

    def round(self, downlink: bytes, round_index: int, *, measure_memory: bool = False) -> tuple[bytes, TrainMetrics]:
        model = self._model(downlink)
        metrics = self.local_train(model, round_index, measure_memory=measure_memory)
        return encode_dense(model.state_dict(), self.models.names), metrics

    def evaluation_model(self, downlink: bytes, round_index: int) -> nn.Module:
        return self._model(downlink)


@pytest.fixture
def trimmed_mean():
    spec = register("trimmed_mean_test", server=TrimmedMeanServer, client=TrimmedMeanClient,
                    config=TrimmedMeanConfig)
    yield spec
    unregister("trimmed_mean_test")


def _config(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.load(None, ["rounds=6", "client_fraction=1.0", "local_epochs=2", "batch_size=20",
                                        "lr=0.1", "momentum=0.0", "progress=false", *overrides])


def test_a_federation_from_plain_tensors_with_a_user_model_loss_and_algorithm(tmp_path, trimmed_mean):
    data = _blobs()
    seen_losses = []

    def smoothed(logits, targets):
        seen_losses.append(1)
        return F.cross_entropy(logits, targets, label_smoothing=0.05)

    config = _config("algorithm=trimmed_mean_test", "trimmed_mean_test.trim=1")
    result = run(config, model_fn=TinyNet, data=data, loss_fn=smoothed, output_dir=tmp_path)
    assert seen_losses  # the user's loss trained the model
    assert result.summary["final_acc_pooled"] > 0.85, result.summary  # chance: 1/3
    assert result.summary["algorithm"] == "trimmed_mean_test" and result.summary["execution"] == "dense"
    assert len(result.history[-1]["acc_per_client"]) == 3  # the data decided the federation's size

    # the run folder records what was really used, not the config's defaults
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["name"] == "custom" and saved["data"]["dataset"] == "custom" and saved["clients"] == 3
    assert saved["trimmed_mean_test"] == {"trim": 1}
    setup = json.loads((tmp_path / "run.json").read_text())
    assert setup["model"]["class"].endswith("TinyNet")
    assert setup["model"]["parameters"] == sum(p.numel() for p in TinyNet().parameters())
    assert setup["data"]["source"] == "user" and setup["data"]["train_samples"] == [100, 100, 100]
    assert setup["data"]["input_shape"] == [2] and setup["algorithm"] == "trimmed_mean_test"

    # resuming with other data is refused; with the same, the finished run is returned as is
    with pytest.raises(CheckpointError, match="another data"):
        run(config, model_fn=TinyNet, data=_blobs(seed=1), output_dir=tmp_path, resume=True)
    again = run(config, model_fn=TinyNet, data=data, output_dir=tmp_path, resume=True)
    assert again.history == result.history


def test_the_section_of_a_user_algorithm_is_typed_and_checked(trimmed_mean):
    assert ExperimentConfig.load(None, ["algorithm=trimmed_mean_test"]).trimmed_mean_test.trim == 1
    with pytest.raises(ValueError, match="trimmed_mean_test.trim must be >= 0, got -1"):
        ExperimentConfig.load(None, ["trimmed_mean_test.trim=-1"])
    with pytest.raises(ValueError, match="unknown config key.*trimmed_mean_test.nonsense"):
        ExperimentConfig.load(None, ["trimmed_mean_test.nonsense=1"])
    with pytest.raises(ValueError, match="already registered"):
        register("trimmed_mean_test", server=TrimmedMeanServer, client=TrimmedMeanClient)
    assert "trimmed_mean_test" in names()


def test_unregistered_algorithms_and_bad_registrations_are_clear_errors():
    assert "trimmed_mean_test" not in names()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ExperimentConfig.load(None, ["algorithm=trimmed_mean_test"])
    with pytest.raises(TypeError, match="subclass of fedspa.algorithms.Server"):
        register("broken", server=object, client=TrimmedMeanClient)
    with pytest.raises(ValueError, match="ExperimentConfig field"):
        register("rounds", server=TrimmedMeanServer, client=TrimmedMeanClient, config=TrimmedMeanConfig)
    assert "rounds" not in names() and "broken" not in names()


def test_builtin_sections_and_moved_keys():
    config = ExperimentConfig.load(None, ["ditto.lambda=0.5", "fedprox.mu=0.2", "sub_fedavg.prune_rate=0.1",
                                          "fedavg_ft.epochs=3", "fedrep.head_epochs=2"])
    assert (config.ditto.lambda_, config.fedprox.mu, config.sub_fedavg.prune_rate, config.fedavg_ft.epochs,
            config.fedrep.head_epochs) == (0.5, 0.2, 0.1, 3, 2)
    assert config.get("ditto.lambda") == 0.5 and config.to_dict()["ditto"] == {"lambda": 0.5}
    for old, new in (("ditto_lambda=0.5", "ditto.lambda"), ("finetune_epochs=2", "fedavg_ft.epochs"),
                     ("fedspa.prune_rate=0.1", "sub_fedavg.prune_rate")):
        with pytest.raises(ValueError, match=f"is now {new}"):
            ExperimentConfig.load(None, [old])
    with pytest.raises(ValueError, match="fedprox.mu must be >= 0"):
        ExperimentConfig.load(None, ["fedprox.mu=-1"])


@pytest.mark.parametrize("record,message", [
    ({"samples": 3, "flops": 1.0}, "'loss' is missing"),
    ({"loss": float("nan"), "samples": 3, "flops": 1.0}, "'loss' must be finite"),
    ({"loss": 1.0, "samples": 0, "flops": 1.0}, "out of range"),
    ({"loss": 1.0, "samples": 2.5, "flops": 1.0}, "'samples' must be an integer"),
    ({"loss": 1.0, "samples": "3", "flops": 1.0}, "'samples' must be a number"),
])
def test_train_metrics_from_a_client_are_checked(record, message):
    with pytest.raises(ValueError, match=message):
        TrainMetrics.from_record(record)


def test_train_metrics_round_trip():
    metrics = TrainMetrics(0.5, 12, 3e6, 1024, 0.1, {"personal_loss": 0.25})
    assert TrainMetrics.from_record(metrics.to_record()) == metrics


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_clients_together(tmp_path):
    digits = ["data.dataset=digits", "data.samples_per_client=250", "clients=4", "model.name=mlp", "model.width=8",
              "rounds=2", "measure_memory=false"]
    fedavg = run(_config(*digits, "algorithm=fedavg"), output_dir=tmp_path / "a").history
    prox0 = run(_config(*digits, "algorithm=fedprox", "fedprox.mu=0"), output_dir=tmp_path / "b").history
    assert [h["train_loss"] for h in prox0] == [h["train_loss"] for h in fedavg]
    strong = run(_config(*digits, "algorithm=fedprox", "fedprox.mu=10"), output_dir=tmp_path / "c").history
    assert strong[0]["train_loss"] > fedavg[0]["train_loss"]  # the proximal term holds the clients back


def test_fedrep_trains_the_head_first_and_shares_only_the_body(tmp_path):
    digits = ["data.dataset=digits", "data.samples_per_client=250", "clients=4", "model.name=mlp", "model.width=8",
              "rounds=1", "measure_memory=false"]
    fedper = run(_config(*digits, "algorithm=fedper"), output_dir=tmp_path / "a").summary
    fedrep = run(_config(*digits, "algorithm=fedrep", "fedrep.head_epochs=1"), output_dir=tmp_path / "b").summary
    none = run(_config(*digits, "algorithm=fedrep", "fedrep.head_epochs=0"), output_dir=tmp_path / "c").summary
    assert fedrep["bytes_up"] == fedper["bytes_up"]  # the body, as FedPer
    assert fedrep["training_flops"] > none["training_flops"]  # the head epoch costs its own FLOPs
