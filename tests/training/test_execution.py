"""Measured layer execution: each masked layer runs the way that was timed faster, once per case, cached on disk."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from fedspa import execution
from fedspa.config import ExperimentConfig
from fedspa.execution import Timing, TimingCache, fastest_sparse, layer_case, layer_inputs, time_layer
from fedspa.nn import SparseConv2d, SparseLinear, WeightMask, apply_masks
from fedspa.train import federation


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def _masks(model, density=0.3):
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.dim() >= 2}


def test_time_layer_measures_both_ways_for_linear_and_conv():
    for module, shape in ((nn.Linear(64, 32), (8, 64)), (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10))):
        mask = torch.rand(module.weight.shape) < 0.2
        timing = time_layer(module, mask, shape, input_grad=True, repeats=2)
        assert timing.sparse_ms > 0 and timing.masked_ms > 0
        assert timing.choice in ("sparse", "masked")
        assert module.weight.grad is None  # the layer itself is left alone


def test_layer_inputs_record_shapes_and_which_inputs_need_a_gradient():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = layer_inputs(model, ["0", "3", "5"], torch.randn(5, 1, 8, 8))
    assert seen == {"0": ((5, 1, 8, 8), False), "3": ((5, 256), True), "5": ((5, 16), True)}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_cache_measures_a_case_once_and_shares_it_through_the_file(tmp_path):
    path = tmp_path / "timings.json"
    module, mask = nn.Linear(10, 5), torch.rand(5, 10) < 0.5
    case = layer_case(module, mask, (4, 10), True)
    calls = []

    def measure():
        calls.append(1)
        return Timing(1.0, 2.0)

    assert TimingCache(path).get(case, measure).choice == "sparse"
    assert TimingCache(path).get(case, measure) == Timing(1.0, 2.0)  # another process: read from the file
    assert len(calls) == execution.PASSES  # measured in the first call only (once per pass)
    other = layer_case(module, mask, (8, 10), True)  # another batch is another case
    TimingCache(path).get(other, lambda: Timing(3.0, 1.0))
    assert len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize("content", ["not json", json.dumps({"version": 99, "entries": {}}),
                                     json.dumps({"version": 1, "entries": {"k": {"sparse_ms": "nan", "masked_ms": 1}}}),
                                     json.dumps({"version": 1, "entries": {"k": {"sparse_ms": 1}}}),
                                     json.dumps([1, 2])])
def test_a_malformed_cache_file_is_ignored_and_rebuilt(content, tmp_path, caplog):
    path = tmp_path / "timings.json"
    path.write_text(content)
    case = layer_case(nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.bool), (1, 3), False)
    with caplog.at_level(logging.WARNING, logger="fedspa"):
        assert TimingCache(path).get(case, lambda: Timing(2.0, 1.0)).choice == "masked"
    assert "ignoring the layer timing cache" in caplog.text
    assert json.loads(path.read_text())["version"] == execution.CACHE_VERSION


def test_densities_share_a_bucket_and_the_key_names_the_machine():
    module = nn.Linear(100, 10)
    a = layer_case(module, torch.rand(10, 100) < 0.101, (4, 100), True)
    assert a.density in (0.1, 0.15, 0.05) and a.threads == torch.get_num_threads() and a.device.startswith("cpu:")
    assert execution.density_bucket(0.0001) == 0.05 and execution.density_bucket(0.99) == 1.0


def test_each_layer_runs_the_way_it_was_measured_faster():
    model, cache = _net(), TimingCache(None)
    masks = _masks(model)
    # preset timings: the conv measured faster dense x mask, the linears faster sparse
    verdicts = {"0.weight": Timing(5.0, 1.0), "3.weight": Timing(1.0, 5.0), "5.weight": Timing(1.0, 5.0)}
    inputs = layer_inputs(model, ["0", "3", "5"], torch.randn(2, 1, 8, 8))
    for name, timing in verdicts.items():
        module = model.get_submodule(name[0])
        cache.entries[layer_case(module, masks[name], *inputs[name[0]]).key()] = timing
    timings = fastest_sparse(model, masks, torch.randn(2, 1, 8, 8), cache, inputs=inputs)
    assert timings == verdicts  # nothing measured: all from the cache
    chosen = {n for n, t in timings.items() if t.choice == "sparse"}
    plan = apply_masks(model, masks, sparse_names=chosen)
    assert plan == {"0.weight": "masked", "3.weight": "sparse", "5.weight": "sparse"}
    assert isinstance(model[0].parametrizations.weight[0], WeightMask)
    assert isinstance(model[3], SparseLinear) and isinstance(model[5], SparseLinear)


def _client_plan(policy, monkeypatch, verdict):
    monkeypatch.setattr(execution, "time_layer", lambda module, mask, shape, grad, repeats=5: verdict(module))
    monkeypatch.setattr(execution, "_CACHES", {})
    config = ExperimentConfig.load(None, ["data.dataset=digits", "data.samples_per_client=60", "clients=2",
                                          "model.name=cnn", "model.width=4", "fedspa.density=0.3",
                                          f"fedspa.sparse_policy={policy}", "progress=false"])
    fed = federation(config)
    client = fed.clients[0]
    model = client._execute(client.received_model(fed.server.downlink(0, 0)))
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                                          SparseLinear, SparseConv2d))}


def test_the_fastest_policy_follows_the_measurements_and_memory_keeps_the_density_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSPA_CACHE_DIR", str(tmp_path))
    convs_slow = _client_plan("fastest", monkeypatch,
                              lambda m: Timing(9.0, 1.0) if isinstance(m, nn.Conv2d) else Timing(1.0, 9.0))
    assert all(kind in ("ParametrizedConv2d", "Conv2d", "SparseLinear") for kind in convs_slow.values()), convs_slow
    assert "SparseLinear" in convs_slow.values()
    monkeypatch.setenv("FEDSPA_CACHE_DIR", str(tmp_path / "other"))
    all_slow = _client_plan("fastest", monkeypatch, lambda m: Timing(9.0, 1.0))
    assert not any(kind.startswith("Sparse") for kind in all_slow.values()), all_slow
    monkeypatch.setenv("FEDSPA_CACHE_DIR", str(tmp_path / "third"))
    memory = _client_plan("memory", monkeypatch, lambda m: pytest.fail("the memory policy measures nothing"))
    assert "SparseConv2d" in memory.values() and "SparseLinear" in memory.values()


def test_an_unknown_policy_is_a_config_error():
    with pytest.raises(ValueError, match="fedspa.sparse_policy must be one of fastest, memory"):
        ExperimentConfig.load(None, ["fedspa.sparse_policy=quickest"])


def test_personal_models_are_evaluated_on_the_layers_they_train_on(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSPA_CACHE_DIR", str(tmp_path))
    config = ExperimentConfig.load(None, ["data.dataset=digits", "data.samples_per_client=60", "clients=2",
                                          "model.name=mlp", "model.width=4", "fedspa.density=0.3",
                                          "fedspa.sparse_policy=memory", "progress=false"])
    fed = federation(config)
    client = fed.clients[0]
    downlink = fed.server.evaluation_downlink(0, 0)
    model = client.evaluation_model(downlink, 0)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    dense = federation(ExperimentConfig.load(None, [*[f"{k}={v}" for k, v in (
        ("data.dataset", "digits"), ("data.samples_per_client", 60), ("clients", 2), ("model.name", "mlp"),
        ("model.width", 4), ("fedspa.density", 0.3), ("fedspa.execution", "dense_masked"))], "progress=false"]))
    reference = dense.clients[0].evaluation_model(dense.server.evaluation_downlink(0, 0), 0)
    assert not any(isinstance(m, SparseLinear) for m in reference.modules())
    x = client.data.test_x
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_near_tie_runs_dense_times_mask():
    assert Timing(0.95, 1.0).choice == "masked" and Timing(1.0, 1.0).choice == "masked"
    assert Timing(0.85, 1.0).choice == "sparse"


def _fake_steps(monkeypatch, sparse: list[float], masked: list[float]) -> dict[str, int]:
    """Make every timed step of a SparseLinear take the next of `sparse` ms, of dense x mask the next of `masked`
    (the last value repeats); returns the steps taken per way."""
    taken = {"sparse": 0, "masked": 0}

    def fake_step(layer, x, grad):
        way = "sparse" if isinstance(layer, SparseLinear) else "masked"
        times = sparse if way == "sparse" else masked
        taken[way] += 1
        return times[min(taken[way], len(times)) - 1]

    monkeypatch.setattr(execution, "_step_ms", fake_step)
    return taken


def test_a_few_slow_steps_do_not_change_the_choice(monkeypatch):
    """Noise on a shared machine only ever adds time: a layer whose sparse step takes 6 ms against 10 ms dense x mask
    runs sparse even when 3 of its 5 timed sparse steps were slowed by a neighbour (the median would say 12 ms)."""
    taken = _fake_steps(monkeypatch, [6.0, 6.0, 12.0, 6.0, 12.0, 12.0], [10.0])  # the first step is the warm-up
    timing = time_layer(nn.Linear(16, 8), torch.rand(8, 16) < 0.3, (4, 16), input_grad=True, repeats=5)
    assert timing == Timing(6.0, 10.0) and timing.choice == "sparse"
    assert taken == {"sparse": 6, "masked": 6}  # 0.6x is far from the margin: decided after 5 timed steps


@pytest.mark.parametrize("sparse_ms", [7.7, 9.0, 10.3])
def test_a_case_near_the_margin_is_timed_longer(monkeypatch, sparse_ms):
    """Ratios within 15% of the 0.9 margin take 2 x 5 more steps per way; the fastest of all 15 decides."""
    taken = _fake_steps(monkeypatch, [sparse_ms] * 6 + [sparse_ms - 2.0], [10.0])
    timing = time_layer(nn.Linear(16, 8), torch.rand(8, 16) < 0.3, (4, 16), input_grad=True, repeats=5)
    assert taken == {"sparse": 16, "masked": 16}
    assert timing == Timing(sparse_ms - 2.0, 10.0) and timing.choice == "sparse"


@pytest.mark.parametrize("sparse_ms", [7.6, 10.4])
def test_a_case_clear_of_the_margin_is_not_timed_longer(monkeypatch, sparse_ms):
    taken = _fake_steps(monkeypatch, [sparse_ms], [10.0])
    time_layer(nn.Linear(16, 8), torch.rand(8, 16) < 0.3, (4, 16), input_grad=True, repeats=5)
    assert taken == {"sparse": 6, "masked": 6}


def test_each_case_is_timed_in_two_passes_over_the_layers_and_the_faster_of_each_way_kept():
    """A moment of contention on a shared machine can slow one layer's whole measurement (observed: ResNet-18's
    128 -> 128 conv at 1.6-1.9x its usual sparse time for all its steps). Every case is therefore timed twice, once
    in each of two passes over the layers, so that the two timings of a layer lie the other layers' measurements
    apart, and each way keeps its faster time. Two layers of the same case are timed as one."""
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 5))
    masks = {f"{i}.weight": torch.rand(model[i].weight.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i in (2, 4, 6)}
    masks["4.weight"] = masks["2.weight"].clone()  # layers 2 and 4 are one case (shape, input, density)
    calls = []
    first = {"2": Timing(9.0, 2.0), "6": Timing(1.0, 3.0)}  # layer 2's first timing hit a busy moment
    second = {"2": Timing(1.0, 2.5), "6": Timing(1.5, 2.0)}

    def fake_time_layer(module, mask, shape, grad, repeats=5):
        name = next(n for n, m in model.named_children() if m is module)
        calls.append(name)
        return (first if calls.count(name) == 1 else second)[name]

    import unittest.mock
    with unittest.mock.patch.object(execution, "time_layer", fake_time_layer):
        timings = fastest_sparse(model, masks, torch.randn(3, 12), TimingCache(None))
    assert calls == ["2", "6", "2", "6"]  # pass 1 over every case, then pass 2
    assert timings["2.weight"] == timings["4.weight"] == Timing(1.0, 2.0)
    assert timings["6.weight"] == Timing(1.0, 2.0)
    assert timings["2.weight"].choice == "sparse"
