"""Models beyond Linear/Conv2d: BatchNorm statistics are federated (or kept local), and weights no sparse layer
supports (depthwise convs, Embedding, MultiheadAttention's packed projection) run as dense weights x mask."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedspa.config import ExperimentConfig
from fedspa.data import FederatedData, federated_data
from fedspa.masks import density_of
from fedspa.nn import apply_masks, mask_in_forward, masked_weight_values
from fedspa.train import federation, read_checkpoint, run
from tests.helpers import FAST_SGD

DIGITS = ["data.dataset=digits", "data.samples_per_client=250", "data.alpha=0.5", "clients=4", "client_fraction=1.0",
          "rounds=6", "local_epochs=3", "batch_size=25", "measure_memory=false", "progress=false",
          "fedspa.density=0.3", "sub_fedavg.prune_rate=0.2", "fedspa.sparse_policy=memory"] + FAST_SGD


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


class DepthwiseSeparableCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise
                                 nn.Conv2d(16, 32, 1), nn.ReLU(),  # pointwise
                                 nn.Flatten(), nn.Linear(32 * 8 * 8, 10))

    def forward(self, x):
        return self.net(x)


class TinyTransformer(nn.Module):
    """Token ids -> Embedding -> one Transformer encoder layer (MultiheadAttention + feed-forward) -> mean -> head."""

    def __init__(self, vocab: int = 16, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _token_data(clients: int = 4, per_client: int = 160, seed: int = 0) -> FederatedData:
    """Sequences of 8 tokens; class c draws most tokens from its own band of 4 (a bag-of-words task)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for k in range(clients):
        y = torch.multinomial(torch.tensor([0.55 if c == k % 4 else 0.15 for c in range(4)]), per_client,
                              replacement=True, generator=g)
        own = 4 * y[:, None] + torch.randint(0, 4, (per_client, 8), generator=g)
        noise = torch.randint(0, 16, (per_client, 8), generator=g)
        x = torch.where(torch.rand(per_client, 8, generator=g) < 0.6, own, noise)
        train.append((x[:120], y[:120]))
        test.append((x[120:], y[120:]))
    return FederatedData.from_tensors(train, test)


def _server_state(result):
    return read_checkpoint(result.output_dir / "checkpoint.pt")


# ------------------------------------------------------------------------------------------------------------------
# BatchNorm statistics
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fedavg", "ditto", "sub_fedavg", "fedspa"])
def test_batchnorm_statistics_are_federated_and_the_model_learns(tmp_path, algorithm):
    config = ExperimentConfig.load(None, DIGITS + [f"algorithm={algorithm}"])
    result = run(config, model_fn=BatchNormCNN, output_dir=tmp_path)
    assert result.summary["final_acc_pooled"] > 0.8, result.summary  # chance: 0.1
    state = _server_state(result)["server"]["global"]
    for name in ("features.1", "features.4"):
        assert state[f"{name}.running_mean"].abs().sum() > 0  # not the initial zeros
        assert not torch.equal(state[f"{name}.running_var"], torch.ones_like(state[f"{name}.running_var"]))
        assert int(state[f"{name}.num_batches_tracked"]) > 0


def test_local_norm_layers_stay_on_each_client(tmp_path):
    """norm_layers=local (FedBN): BatchNorm parameters and statistics never travel and differ per client."""
    shared = run(ExperimentConfig.load(None, DIGITS + ["algorithm=fedavg", "rounds=2"]), model_fn=BatchNormCNN,
                 output_dir=tmp_path / "shared")
    local = run(ExperimentConfig.load(None, DIGITS + ["algorithm=fedavg", "rounds=2", "norm_layers=local"]),
                model_fn=BatchNormCNN, output_dir=tmp_path / "local")
    # two BN layers of weight, bias, mean, var, count: 10 tensors (11-byte headers) of 194 float32 values
    bn_bytes = 10 * 11 + 4 * (4 * 16 + 1 + 4 * 32 + 1)
    assert shared.summary["bytes_up"] - local.summary["bytes_up"] == 4 * 2 * bn_bytes  # 4 clients, 2 rounds
    state = _server_state(local)
    assert int(state["server"]["global"]["features.1.num_batches_tracked"]) == 0  # the server never saw them
    means = [c["personal.features.1.running_mean"] for c in state["clients"]]
    assert all(m.abs().sum() > 0 for m in means) and not torch.equal(means[0], means[1])
    assert local.summary["final_acc_pooled"] > 0.6


# ------------------------------------------------------------------------------------------------------------------
# Weights without a sparse kernel
# ------------------------------------------------------------------------------------------------------------------
def test_a_masked_weight_stays_masked_through_sgd_with_weight_decay_and_momentum():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    mask = torch.rand(attention.in_proj_weight.shape) < 0.3
    mask_in_forward(attention, {"in_proj_weight": mask})
    optimizer = torch.optim.SGD(attention.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        x = torch.randn(2, 5, 8)
        attention(x, x, x)[0].sum().backward()
        original = attention.parametrizations.in_proj_weight.original
        assert torch.all(original.grad[~mask] == 0)
        optimizer.step()
        optimizer.zero_grad()
        assert torch.all(original[~mask] == 0) and torch.all(attention.in_proj_weight[~mask] == 0)
    values = masked_weight_values(attention, ["in_proj_weight"])["in_proj_weight"]
    assert torch.equal(values != 0, mask & (values != 0)) and values[mask].abs().sum() > 0


def test_a_masked_weight_trains_exactly_like_weight_times_mask_and_survives_copies():
    """The masked weight's trajectory equals an explicit ``w * m`` in the forward bit for bit (clipping, weight decay
    and momentum included), also after a deepcopy and after assigning a value that is nonzero off the mask."""
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 6, 3), nn.Linear(6 * 5 * 5, 4)
    masks = {"0.weight": torch.rand(conv.weight.shape) < 0.5, "2.weight": torch.rand(linear.weight.shape) < 0.4}
    reference = nn.Sequential(copy.deepcopy(conv), nn.Flatten(), copy.deepcopy(linear))
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    masked = mask_in_forward(copy.deepcopy(nn.Sequential(conv, nn.Flatten(), linear)), masks)
    masked = copy.deepcopy(masked)  # a copy must keep masking the gradient

    def forward_reference(x):
        x = F.conv2d(x, reference[0].weight * masks["0.weight"], reference[0].bias)
        return F.linear(x.flatten(1), reference[2].weight * masks["2.weight"], reference[2].bias)

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01) for m in (reference, masked)]
    for _ in range(4):
        x = torch.randn(5, 3, 7, 7)
        for forward, model, optimizer in ((forward_reference, reference, optimizers[0]),
                                          (masked, masked, optimizers[1])):
            optimizer.zero_grad()
            forward(x).square().sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    for name, mask in masks.items():
        value = masked_weight_values(masked, [name])[name]
        assert torch.equal(value, reference.get_parameter(name) * mask) and torch.all(value[~mask] == 0)
    masked[2].weight = torch.ones_like(linear.weight)  # an assignment keeps only the mask's entries
    assert torch.equal(masked[2].weight, masks["2.weight"].float())


def test_apply_masks_picks_sparse_layers_only_where_they_exist():
    model = TinyTransformer()
    masks = {n: torch.rand(p.shape) < 0.3 for n, p in model.named_parameters() if p.dim() >= 2}
    plan = apply_masks(model, masks, sparse=True, sparse_max_density=0.5)
    assert plan == {"embed.weight": "masked", "encoder.self_attn.in_proj_weight": "masked",
                    "encoder.self_attn.out_proj.weight": "masked",  # MultiheadAttention reads it directly
                    "encoder.linear1.weight": "sparse", "encoder.linear2.weight": "sparse", "head.weight": "sparse"}
    model(torch.randint(0, 16, (3, 8))).sum().backward()  # the encoder trains with sparse feed-forward layers


def _fedspa(model_fn, data, tmp_path, *overrides):
    config = ExperimentConfig.load(None, ["algorithm=fedspa", "rounds=8", "client_fraction=1.0", "local_epochs=3",
                                          "batch_size=20", "fedspa.density=0.3", "progress=false",
                                          "measure_memory=false", "fedspa.sparse_policy=memory", *FAST_SGD,
                                          *overrides])
    result = run(config, model_fn=model_fn, data=data, output_dir=tmp_path)
    _check_masks(result, federation(config, model_fn=model_fn, data=data))
    return result


def _check_masks(result, fed):
    """Masks hold the configured density and nnz, and every client's model is zero off its mask."""
    state = _server_state(result)
    for k, masks in enumerate(state["server"]["masks"]):
        assert density_of(masks) == pytest.approx(0.3, abs=0.01)
        for name, mask in masks.items():
            assert int(mask.sum()) == int(fed.server.masks[k][name].sum())  # nnz fixed
            assert not torch.equal(mask, fed.server.masks[k][name])  # and evolved
    fed.server.load_state_dict(state["server"])
    for k, client in enumerate(fed.clients):
        client.load_state_dict(state["clients"][k])
        model = client.evaluation_model(fed.server.evaluation_downlink(k, 0), 0)
        params = masked_weight_values(model, list(client.mask))  # however each weight runs (sparse or dense)
        for name, mask in client.mask.items():
            assert torch.all(params[name][~mask] == 0) and params[name][mask].abs().sum() > 0


def test_fedspa_trains_a_depthwise_separable_cnn(tmp_path, caplog):
    data = federated_data(ExperimentConfig.load(None, DIGITS).data, 4)
    with caplog.at_level(logging.WARNING, logger="fedspa"):
        result = _fedspa(DepthwiseSeparableCNN, data, tmp_path)
    assert result.summary["final_acc_pooled"] > 0.6, result.summary
    lines = [r.message for r in caplog.records if "no sparse kernel" in r.message]
    assert lines == ["fedspa: no sparse kernel for net.2.weight (Conv2d, groups=16): it runs as dense weights x mask"]


def test_fedspa_trains_a_transformer_with_embedding_and_attention(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedspa"):
        result = _fedspa(TinyTransformer, _token_data(), tmp_path, "lr=0.1", "rounds=10")
    assert result.summary["final_acc_pooled"] > 0.6, result.summary  # chance: 0.25
    lines = [r.message for r in caplog.records if "no sparse kernel" in r.message]
    assert len(lines) == 1
    for name in ("embed.weight (Embedding)", "encoder.self_attn.in_proj_weight (MultiheadAttention.in_proj_weight)",
                 "encoder.self_attn.out_proj.weight (NonDynamicallyQuantizableLinear)"):
        assert name in lines[0]


class ReadsItsChildWeight(nn.Module):
    """A model whose forward uses a child Linear's weight tensor itself: sparse layers cannot stand in for it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        hidden = torch.relu(nn.functional.linear(x.flatten(1), self.body.weight, self.body.bias))
        return self.head(hidden)


def test_a_model_that_cannot_run_sparse_falls_back_to_dense_times_mask(tmp_path, caplog):
    data = federated_data(ExperimentConfig.load(None, DIGITS).data, 4)
    with caplog.at_level(logging.WARNING, logger="fedspa"):
        result = _fedspa(ReadsItsChildWeight, data, tmp_path, "rounds=4")
    assert result.summary["final_acc_pooled"] > 0.6, result.summary
    assert any("does not run with sparse layers" in r.message and "dense weights x mask" in r.message
               for r in caplog.records)
