"""A FedSpa client keeps its prepared model between uses: a new payload rewrites its values in place and a new mask
rebuilds only the changed patterns, with results identical to building the model afresh every time; a process-wide
budget evicts the least recently used clients' models."""

from __future__ import annotations

import math

import pytest
import torch

from fedspa.algorithms import fedspa as fedspa_alg
from fedspa.config import ExperimentConfig
from fedspa.nn import SparseConv2d, SparseLinear, masked_weight_values
from fedspa.train import federation, run

# a CNN whose conv and linear layers run sparse (memory policy) and whose masks move every round
TINY = ["data.dataset=digits", "data.samples_per_client=120", "clients=3", "client_fraction=0.67", "model.name=cnn",
        "model.width=4", "fedspa.density=0.3", "rounds=4", "local_epochs=1", "batch_size=20", "progress=false",
        "measure_memory=false", "fedspa.sparse_policy=memory", "checkpoint_every=100"]


def _history(tmp_path, name, overrides):
    result = run(ExperimentConfig.load(None, TINY + overrides), output_dir=tmp_path / name)
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in result.history]


@pytest.mark.parametrize("overrides", [[], ["fedspa.regrown_init=zero"], ["fedspa.execution=dense_masked"],
                                       ["algorithm=feddst", "feddst.readjust_interval=2"],
                                       ["algorithm=sub_fedavg", "fedspa.density=0.5"]],
                         ids=["fedspa", "regrown-zero", "dense-masked", "feddst", "sub_fedavg"])
def test_a_kept_model_gives_exactly_the_results_of_a_rebuilt_one(tmp_path, monkeypatch, overrides):
    kept = _history(tmp_path, "kept", overrides)
    monkeypatch.setattr(fedspa_alg.MODEL_CACHE, "budget_bytes", 0)  # every use builds the model afresh
    rebuilt = _history(tmp_path, "rebuilt", overrides)
    assert kept == rebuilt


def test_the_model_is_built_once_per_client_and_then_only_refilled(monkeypatch):
    built = []
    original = fedspa_alg.FedSpaClient._execute
    monkeypatch.setattr(fedspa_alg.FedSpaClient, "_execute",
                        lambda self, model: built.append(self.client_id) or original(self, model))
    fed = federation(ExperimentConfig.load(None, TINY))
    for t in range(3):
        fed.round(t)
        fed.evaluate(t)
    assert sorted(built) == [0, 1, 2]  # one build per client, in three rounds of training and evaluation
    client = fed.clients[0]
    model = client._executed[0]
    assert any(isinstance(m, SparseConv2d) for m in model.modules())
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())  # no gradient is kept between rounds


def test_a_moved_mask_rebuilds_the_pattern_and_the_values_land_at_it():
    fed = federation(ExperimentConfig.load(None, TINY))
    server, client = fed.server, fed.clients[0]
    client.model_for(server.downlink(0, 0), training=True)
    moved = {n: m.clone() for n, m in client.mask.items()}
    for name, mask in moved.items():  # move one active weight of every masked tensor
        flat = mask.reshape(-1)
        on, off = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
        flat[on], flat[off] = False, True
    server.masks[0] = moved
    server.server_knows_mask[0] = False  # the next downlink carries the positions
    model = client.model_for(server.downlink(0, 1))
    global_state = server.global_model.state_dict()
    weights = masked_weight_values(model, list(moved))
    kinds = set()
    for name, mask in moved.items():
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, (SparseLinear, SparseConv2d)):
            kinds.add("sparse")
            assert torch.equal(module.mask(), mask)
        else:
            kinds.add("masked")
            assert torch.equal(module.parametrizations.weight[0].mask, mask)
        torch.testing.assert_close(weights[name], global_state[name] * mask)
    assert kinds == {"sparse", "masked"}  # both ways of running a weight moved


def test_the_budget_evicts_the_least_recently_used_models(monkeypatch):
    fed = federation(ExperimentConfig.load(None, TINY + ["clients=3", "client_fraction=1.0"]))
    sizes = []
    for k in range(3):
        fed.clients[k].model_for(fed.server.downlink(k, 0))
        sizes.append(fedspa_alg.MODEL_CACHE._held[id(fed.clients[k])][1])
    cache = fedspa_alg.ModelCache(budget_bytes=sizes[1] + sizes[2])
    monkeypatch.setattr(fedspa_alg, "MODEL_CACHE", cache)
    for k in range(3):
        fed.clients[k].model_for(fed.server.downlink(k, 0))
    assert fed.clients[0]._executed is None  # the oldest was evicted
    assert fed.clients[1]._executed is not None and fed.clients[2]._executed is not None
    fed.clients[0].model_for(fed.server.downlink(0, 0))  # used again: now client 1 is the oldest
    assert fed.clients[1]._executed is None and fed.clients[0]._executed is not None


@pytest.mark.parametrize("value", ["x", "-1", "nan"])
def test_the_budget_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("FEDSPA_MODEL_CACHE_MB", value)
    with pytest.raises(ValueError, match="FEDSPA_MODEL_CACHE_MB"):
        fedspa_alg._cache_budget()
    monkeypatch.setenv("FEDSPA_MODEL_CACHE_MB", "2.5")
    assert fedspa_alg._cache_budget() == math.floor(2.5 * 2**20)
