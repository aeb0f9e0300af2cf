"""FedSpa's ablations: a personal dense head (fedspa.personal_head) and one mask shared by all clients
(fedspa.mask_scope = shared)."""

from __future__ import annotations

import pytest
import torch

from fedspa.algorithms.base import Upload
from fedspa.algorithms.base import last_linear_names
from fedspa.config import ExperimentConfig
from fedspa.train import federation, run
from tests.helpers import FAST_SGD

TINY = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=3", "client_fraction=1.0",
        "model.name=mlp", "model.width=8", "fedspa.density=0.3", "rounds=3", "local_epochs=1", "batch_size=25",
        "progress=false", "measure_memory=false", "fedspa.sparse_policy=memory"] + FAST_SGD
SHARED = ["fedspa.mask_scope=shared", "fedspa.regrowth=random"]  # the server has no gradients to regrow by


def _rounds(fed, rounds):
    server = fed.server
    for t in range(rounds):
        received = []
        for k in server.sample(t):
            payload, metrics = fed.clients[k].round(server.downlink(k, t), t)
            received.append(server.receive(Upload(k, payload, metrics, round_index=t)))
        server.aggregate(received, t)


def test_a_personal_head_stays_dense_on_each_client_and_never_travels(tmp_path):
    fed = federation(ExperimentConfig.load(None, TINY + ["fedspa.personal_head=true"]))
    head = last_linear_names(fed.models.template)
    assert len(head) == 2
    server, clients = fed.server, fed.clients
    assert not head & set(server.wire_names) and not head & set(server.mask_shapes)
    initial = {n: server.global_model.state_dict()[n].clone() for n in head}
    _rounds(fed, 2)
    for n in head:  # the server never saw a head; every client trained its own, dense
        assert torch.equal(server.global_model.state_dict()[n], initial[n])
        heads = [c.personal[n] for c in clients]
        assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], initial[n])
        assert bool((heads[0] != 0).all())
    # and the personal model is evaluated with it
    weight = sorted(n for n in head if n.endswith("weight"))[0]
    model = clients[0].evaluation_model(server.evaluation_downlink(0, 2), 2)
    assert torch.equal(model.state_dict()[weight], clients[0].personal[weight])
    plain = run(ExperimentConfig.load(None, TINY + ["local_epochs=4"]), output_dir=tmp_path / "plain")
    personal = run(ExperimentConfig.load(None, TINY + ["local_epochs=4", "fedspa.personal_head=true"]),
                   output_dir=tmp_path / "head")
    assert personal.summary["bytes_up"] < plain.summary["bytes_up"]
    assert personal.summary["final_acc_pooled"] > 0.6  # chance: 0.1


def test_shared_masks_are_one_mask_updated_at_the_server():
    fed = federation(ExperimentConfig.load(None, TINY + SHARED + ["fedspa.regrown_init=zero"]))
    server = fed.server
    names = list(server.mask_shapes)
    first = {n: server.masks[0][n].clone() for n in names}
    assert all(torch.equal(m[n], first[n]) for m in server.masks for n in names)
    _rounds(fed, 1)
    after = server.masks[0]
    # the one mask moved (drop fraction > 0 in round 1), kept its size, and is every client's
    assert any(not torch.equal(after[n], first[n]) for n in names)
    assert all(int(after[n].count_nonzero()) == int(first[n].count_nonzero()) for n in names)
    assert all(torch.equal(m[n], after[n]) for m in server.masks for n in names)
    assert server.server_knows_mask == [False] * 3  # the next downlinks carry the new positions
    state = server.global_model.state_dict()
    for n in names:  # regrown_init = zero: the regrown positions start at 0
        assert bool((state[n][after[n] & ~first[n]] == 0).all())
    # every client adopts it from its next downlink and trains under it
    _rounds(fed, 2)
    for c in fed.clients:
        c.received_model(server.downlink(c.client_id, 2))
        assert all(torch.equal(c.mask[n], server.masks[0][n]) for n in names)


def test_a_shared_mask_upload_must_keep_the_mask_it_was_sent():
    fed = federation(ExperimentConfig.load(None, TINY + SHARED))
    server, client = fed.server, fed.clients[0]

    def moved(model, weights, round_index):  # a client that moves the mask itself
        return {n: m.flip(-1) for n, m in client.mask.items()}, 0.0

    client.update_masks = moved
    payload, metrics = client.round(server.downlink(0, 0), 0)
    with pytest.raises(ValueError, match="with shared masks a client uploads at the mask it was sent"):
        server.receive(Upload(0, payload, metrics, round_index=0))


@pytest.mark.parametrize("overrides,message", [
    (["fedspa.mask_scope=shared", "fedspa.regrowth=gradient"], "regrowth must be random with mask_scope=shared"),
    (["fedspa.mask_scope=global"], "mask_scope must be one of personal, shared"),
])
def test_bad_mask_scopes(overrides, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.load(None, TINY + overrides)


def test_sub_fedavg_has_no_shared_masks():
    with pytest.raises(ValueError, match="mask_scope=shared is FedSpa.s ablation; sub_fedavg keeps a mask per client"):
        federation(ExperimentConfig.load(None, TINY + ["algorithm=sub_fedavg", *SHARED]))


def test_the_peak_memory_includes_the_dense_step_of_gradient_regrowth():
    """|gradient| regrowth runs one dense forward/backward: the client's peak memory must count it."""
    common = TINY + ["fedspa.density=0.1", "measure_memory=true", "rounds=1", "model.width=32"]
    peaks = {}
    for regrowth in ("random", "gradient"):
        fed = federation(ExperimentConfig.load(None, common + [f"fedspa.regrowth={regrowth}"]))
        _, metrics = fed.clients[0].round(fed.server.downlink(0, 0), 0, measure_memory=True)
        peaks[regrowth] = metrics.peak_memory
    dense_bytes = sum(t.numel() * t.element_size() for t in fed.models.template.parameters())
    assert peaks["gradient"] >= 2 * dense_bytes > peaks["random"]  # a dense copy and its gradient
