"""FedDST: one global mask, readjusted by the clients every readjust_interval rounds and re-formed at the server
(union of the uploaded masks, magnitude-pruned back to the target)."""

from __future__ import annotations

import pytest
import torch

from fedspa.algorithms.base import Upload
from fedspa.algorithms.feddst import readjust_fraction
from fedspa.config import ExperimentConfig
from fedspa.train import federation

TINY = ["algorithm=feddst", "data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=3",
        "client_fraction=1.0", "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=6", "local_epochs=2",
        "batch_size=25", "progress=false", "measure_memory=false", "fedspa.sparse_policy=memory",
        "feddst.readjust_interval=2"]


def _round(fed, t):
    server = fed.server
    before = {n: m.clone() for n, m in server.masks[0].items()}
    received = []
    for k in server.sample(t):
        payload, metrics = fed.clients[k].round(server.downlink(k, t), t)
        received.append(server.receive(Upload(k, payload, metrics, round_index=t)))
    server.aggregate(received, t)
    return received, before


def test_readjustment_rounds():
    config = ExperimentConfig.load(None, TINY)
    assert [t for t in range(6) if readjust_fraction(config, t) > 0] == [1, 3, 5]


def test_one_global_mask_readjusted_by_the_clients_and_re_formed_at_the_server():
    fed = federation(ExperimentConfig.load(None, TINY))
    server = fed.server
    names = list(server.mask_shapes)
    assert all(torch.equal(m[n], server.masks[0][n]) for m in server.masks for n in names)
    received, before = _round(fed, 0)  # not a readjustment round: every upload at the global mask
    assert all(torch.equal(r.masks[n], before[n]) for r in received for n in names)
    assert all(torch.equal(server.masks[0][n], before[n]) for n in names)
    received, before = _round(fed, 1)  # a readjustment round
    uploaded = [r.masks for r in received]
    assert any(not torch.equal(m[n], before[n]) for m in uploaded for n in names)  # the clients moved
    state = server.global_model.state_dict()
    for n in names:
        new = server.masks[0][n]
        union = torch.stack([m[n] for m in uploaded]).any(0)
        assert int(new.count_nonzero()) == server.targets[n]  # back to the target count
        assert not bool((new & ~union).any())  # only positions some client holds
        # the kept ones are the largest aggregated magnitudes among the union's
        kept, dropped = state[n][new].abs(), state[n][union & ~new].abs()
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max())
        assert bool((state[n][~new] == 0).all())  # weights outside the global mask are 0
    assert all(torch.equal(m[n], server.masks[0][n]) for m in server.masks for n in names)
    assert server.server_knows_mask == [False] * 3


def test_a_readjusted_mask_outside_a_readjustment_round_is_refused():
    fed = federation(ExperimentConfig.load(None, TINY))
    server, client = fed.server, fed.clients[0]
    payload, metrics = client.round(server.downlink(0, 1), 1)  # readjusted in round 1 (0-based)
    with pytest.raises(ValueError, match="only in readjustment rounds, round 1 is not one"):
        server.receive(Upload(0, payload, metrics, round_index=0))
    server.receive(Upload(0, payload, metrics, round_index=1))  # where it belongs


def test_feddst_is_evaluated_on_the_global_model():
    fed = federation(ExperimentConfig.load(None, TINY))
    for t in range(2):
        _round(fed, t)
    server = fed.server
    models = [c.evaluation_model(server.evaluation_downlink(k, 2), 2) for k, c in enumerate(fed.clients)]
    for name, value in models[0].state_dict().items():
        assert all(torch.equal(value, m.state_dict()[name]) for m in models[1:]), name
