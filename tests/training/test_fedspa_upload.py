"""FedSpa's upload is consistent: a client holds only the positions it trained (its training mask) and still has
after the mask update; the positions it regrew carry no trained value and never count in the aggregate."""

from __future__ import annotations

import pytest
import torch

from fedspa.algorithms.base import Upload
from fedspa.config import ExperimentConfig
from fedspa.train import federation

TINY = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=3", "client_fraction=1.0",
        "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=4", "local_epochs=1", "batch_size=25",
        "progress=false", "measure_memory=false", "fedspa.sparse_policy=memory"]


def _round(fed, clients, round_index=0):
    """One round by hand: what each sampled client uploaded (checked) and the server's state before and after."""
    server = fed.server
    before = {n: t.detach().clone().reshape(-1) for n, t in server.global_model.state_dict().items()}
    trained_masks = {k: {n: m.clone() for n, m in server.masks[k].items()} for k in clients}
    received = []
    for k in clients:
        payload, metrics = fed.clients[k].round(server.downlink(k, round_index), round_index)
        received.append(server.receive(Upload(k, payload, metrics, round_index=round_index)))
    server.aggregate(received, round_index)
    after = {n: t.detach().clone().reshape(-1) for n, t in server.global_model.state_dict().items()}
    return received, trained_masks, before, after


@pytest.mark.parametrize("aggregation", ["holders", "mean"])
@pytest.mark.parametrize("regrown_init", ["zero", "global"])
def test_a_regrown_position_does_not_change_the_aggregate(aggregation, regrown_init):
    fed = federation(ExperimentConfig.load(None, TINY + [f"fedspa.aggregation={aggregation}",
                                                         f"fedspa.regrown_init={regrown_init}"]))
    received, trained, before, after = _round(fed, [0, 1, 2])
    regrown_somewhere = 0
    for name in fed.server.mask_shapes:
        numel = before[name].numel()
        total = torch.zeros(numel, dtype=torch.float64)
        holders = torch.zeros(numel, dtype=torch.float64)
        for r in received:
            flat_new = r.masks[name].reshape(-1)
            held = flat_new & trained[r.client][name].reshape(-1)  # trained this round and kept
            regrown_somewhere += int((flat_new & ~held).sum())
            dense = torch.zeros(numel, dtype=torch.float64)
            dense[r.positions[name]] = r.values[name].double()
            if aggregation == "holders":
                total += torch.where(held, dense, 0.0)
            else:
                total += torch.where(held, dense - before[name].double(), 0.0)
            holders += held.double()
        if aggregation == "holders":
            expected = torch.where(holders > 0, total / holders.clamp(min=1), before[name].double())
        else:
            expected = before[name].double() + total / len(received)
        torch.testing.assert_close(after[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert regrown_somewhere > 0  # the round did regrow positions: the test saw what it checks


def test_a_client_alone_leaves_its_regrown_positions_at_the_global_value():
    fed = federation(ExperimentConfig.load(None, TINY))
    (r,), trained, before, after = _round(fed, [0])
    for name in fed.server.mask_shapes:
        regrown = r.masks[name].reshape(-1) & ~trained[0][name].reshape(-1)
        assert int(regrown.sum()) > 0
        torch.testing.assert_close(after[name][regrown], before[name][regrown])  # not pulled to zero


@pytest.mark.parametrize("regrown_init", ["zero", "global"])
def test_regrown_init_decides_what_the_client_starts_a_regrown_weight_at(regrown_init):
    fed = federation(ExperimentConfig.load(None, TINY + [f"fedspa.regrown_init={regrown_init}"]))
    (r,), trained, _, after = _round(fed, [0])
    client = fed.clients[0]
    model = client.received_model(fed.server.downlink(0, 1), training=True)
    state = model.state_dict()
    for name in fed.server.mask_shapes:
        new = r.masks[name].reshape(-1)
        regrown = new & ~trained[0][name].reshape(-1)
        kept = new & ~regrown
        weights = state[name].reshape(-1)
        torch.testing.assert_close(weights[kept], after[name][kept])
        expected = torch.zeros_like(after[name][regrown]) if regrown_init == "zero" else after[name][regrown]
        torch.testing.assert_close(weights[regrown], expected)
    # the personal model the client is evaluated with is the global model at its mask, whatever the init
    evaluated = client.received_model(fed.server.evaluation_downlink(0, 1)).state_dict()
    for name in fed.server.mask_shapes:
        new = r.masks[name].reshape(-1)
        torch.testing.assert_close(evaluated[name].reshape(-1)[new], after[name][new])


def test_an_evaluation_between_rounds_keeps_the_regrown_positions_for_the_next_round():
    """A run evaluates every client after every round: that must not make the client forget what it regrew (the
    dense entries, biases, always travel whole, so 'the server resent my mask' must look at the masked ones)."""
    fed = federation(ExperimentConfig.load(None, TINY + ["fedspa.regrown_init=zero"]))
    (r,), trained, _, after = _round(fed, [0])
    client = fed.clients[0]
    client.evaluate(fed.server.evaluation_downlink(0, 0), 0)
    assert client.regrown is not None
    state = client.received_model(fed.server.downlink(0, 1), training=True).state_dict()
    regrown_any = False
    for name in fed.server.mask_shapes:
        regrown = r.masks[name].reshape(-1) & ~trained[0][name].reshape(-1)
        regrown_any |= bool(regrown.any())
        assert bool((state[name].reshape(-1)[regrown] == 0).all())
        assert bool((after[name][regrown] != 0).any())  # the global value there is not 0: zero is a choice
    assert regrown_any
