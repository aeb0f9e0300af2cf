"""fedspa.nn: sparse layers against dense layers with masked weights; conversion, masks, memory, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fedspa_kernels as fk
from fedspa.nn import SparseConv2d, SparseLinear, densify, masks_of, sparsify, training_memory_bytes
from tests.helpers import backend_device_params

PARAMS = backend_device_params("spmm")


def _masked_copy(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    dense = copy.deepcopy(layer)
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense


def _check_grads(sparse: nn.Module, dense: nn.Module, mask: torch.Tensor, x_shape, device, dtype=torch.float64):
    x = torch.randn(*x_shape, dtype=dtype, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = sparse(x), dense(x2)
    torch.testing.assert_close(y, y2)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y2.backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sparse.weight.values.grad, dense.weight.grad[mask])
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_linear_matches_masked_dense(backend, device):
    dense = nn.Linear(53, 37, dtype=torch.float64, device=device)
    mask = torch.rand(37, 53, device=device) < 0.2
    sparse = SparseLinear.from_dense(dense, mask, backend=backend)
    assert sorted(name for name, _ in sparse.named_parameters()) == ["bias", "weight.values"]
    assert sparse.weight.values.numel() == int(mask.sum())
    _check_grads(sparse, _masked_copy(dense, mask), mask, (5, 53), device)
    sparse.zero_grad()
    _check_grads(sparse, _masked_copy(dense, mask), mask, (1, 53), device)  # batch 1


CONV_GEOMETRIES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=3, stride=2, padding=0, dilation=1),
    dict(kernel_size=5, stride=1, padding=2, dilation=2),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=1),
    dict(kernel_size=1, stride=1, padding=0, dilation=1),
    dict(kernel_size=1, stride=2, padding=0, dilation=1),
    dict(kernel_size=1, stride=(3, 2), padding=0, dilation=2),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "k{kernel_size}-s{stride}-p{padding}-d{dilation}".format(**g))
@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_conv2d_matches_masked_dense(backend, device, geometry):
    dense = nn.Conv2d(5, 7, dtype=torch.float64, device=device, **geometry)
    mask = torch.rand(dense.weight.shape, device=device) < 0.4
    sparse = SparseConv2d.from_dense(dense, mask, backend=backend)
    flat = mask.reshape(7, -1)
    for shape in ((3, 5, 11, 13), (1, 5, 6, 6)):
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        masked = _masked_copy(dense, mask)
        y, y2 = sparse(x), masked(x2)
        torch.testing.assert_close(y, y2)
        y.backward(torch.ones_like(y))
        y2.backward(torch.ones_like(y2))
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(sparse.weight.values.grad, masked.weight.grad.reshape(7, -1)[flat])
        sparse.zero_grad()


def test_layer_constructors_and_errors():
    mask = torch.rand(4, 6) < 0.5
    layer = SparseLinear(6, 4, mask)
    assert layer.weight.nnz == int(mask.sum())
    bound = 1 / 6**0.5
    assert layer.weight.values.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert "nnz=" in repr(layer)
    with pytest.raises(ValueError, match=r"mask shape \(6, 4\) is not \(out_features, in_features\) = \(4, 6\)"):
        SparseLinear(6, 4, mask.t())
    conv_mask = torch.rand(4, 3, 3, 3) < 0.5
    with pytest.raises(ValueError, match="groups=1 only"):
        SparseConv2d(3, 4, 3, conv_mask, groups=2)
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        SparseConv2d(3, 4, 3, conv_mask, padding_mode="reflect")
    with pytest.raises(ValueError, match="integer padding"):
        SparseConv2d(3, 4, 3, conv_mask, padding="same")
    with pytest.raises(ValueError, match=r"mask shape \(4, 3, 3\) is not \(4, 3, 3, 3\)"):
        SparseConv2d(3, 4, 3, conv_mask[..., 0])
    conv = SparseConv2d(3, 4, 3, conv_mask)
    with pytest.raises(ValueError, match=r"expected input \(N, 3, H, W\)"):
        conv(torch.randn(2, 4, 8, 8))


def test_sparsify_densify_and_masks():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10), nn.ReLU(), nn.Linear(10, 3))
    masks = {"0": torch.rand(4, 1, 3, 3) < 0.5, "3": torch.rand(10, 144) < 0.1}
    sparse = sparsify(model, masks)
    assert isinstance(sparse[0], SparseConv2d) and isinstance(sparse[3], SparseLinear)
    assert isinstance(sparse[5], nn.Linear) and isinstance(model[0], nn.Conv2d)  # original untouched
    assert {k: torch.equal(v, masks[k]) for k, v in masks_of(sparse).items()} == {"0": True, "3": True}
    x = torch.randn(2, 1, 8, 8)
    back = densify(sparse)
    assert isinstance(back[0], nn.Conv2d) and isinstance(back[3], nn.Linear)
    torch.testing.assert_close(sparse(x), back(x))
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight.mul_(masks["0"])
        masked[3].weight.mul_(masks["3"])
    torch.testing.assert_close(sparse(x), masked(x))
    with pytest.raises(ValueError, match="'1' is not a Linear or Conv2d layer of the model"):
        sparsify(model, {"1": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask for '5' has shape"):
        sparsify(model, {"5": torch.ones(3, 9, dtype=torch.bool)})


def test_set_mask_keeps_overlap_and_starts_grown_weights_at_zero():
    old = torch.tensor([[True, True, False], [False, True, True]])
    new = torch.tensor([[True, False, True], [False, True, True]])
    layer = SparseLinear(3, 2, old)
    before = layer.weight.dense().clone()
    param = layer.weight.values
    layer.set_mask(new)
    assert torch.equal(layer.mask(), new)
    after = layer.weight.dense()
    assert layer.weight.values is param  # same nnz: updated in place, optimizers keep their reference
    assert torch.equal(after[old & new], before[old & new])
    assert after[0, 2] == 0 and after[0, 1] == 0
    layer.set_mask(torch.tensor([[True, False, False], [False, False, False]]))  # fewer nonzeros: new parameter
    assert layer.weight.nnz == 1 and layer.weight.values is not param
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), x @ layer.weight.dense().t() + layer.bias)
    conv = SparseConv2d(2, 3, 3, torch.rand(3, 2, 3, 3) < 0.5)
    conv_mask = torch.rand(3, 2, 3, 3) < 0.5
    conv.set_mask(conv_mask)
    assert torch.equal(conv.mask(), conv_mask)


def test_state_dict_round_trip():
    mask = torch.rand(8, 9) < 0.4
    layer = SparseLinear(9, 8, mask)
    other = SparseLinear(9, 8, mask)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 9)
    torch.testing.assert_close(other(x), layer(x))


def test_optimizer_state_exists_only_for_active_weights():
    torch.manual_seed(0)
    dense = nn.Linear(512, 256)
    mask = torch.rand(256, 512) < 0.1
    sparse = SparseLinear.from_dense(dense, mask)
    usage = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        usage[name] = training_memory_bytes(model, opt)
    nnz = int(mask.sum())
    assert usage["sparse"]["parameters"] == 4 * (nnz + 256)
    assert usage["sparse"]["gradients"] == 4 * (nnz + 256)
    assert usage["sparse"]["optimizer_state"] == 4 * (nnz + 256)  # momentum buffers
    assert usage["sparse"]["buffers"] == 8 * 257 + 2 * nnz  # the CSR pattern (int16 columns), nothing else
    assert usage["dense"]["optimizer_state"] == 4 * (512 * 256 + 256)
    assert usage["sparse"]["total"] < 0.2 * usage["dense"]["total"]  # at density 0.1


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("density,bound", [(0.5, 0.7), (0.2, 0.35), (0.1, 0.2)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_memory_against_dense(kind, density, bound, momentum):
    """Weights + gradients + optimizer state + index metadata of a sparse layer against the dense layer's, with and
    without momentum: at most 0.7x at density 0.5 and 0.2x at 0.1 (the pattern costs 2 bytes per active weight plus
    8 per row; with 4-byte columns plain SGD would be 0.75x at 0.5)."""
    torch.manual_seed(0)
    dense = nn.Linear(1024, 512) if kind == "linear" else nn.Conv2d(128, 128, 3, padding=1)
    mask = torch.rand(dense.weight.shape) < density
    sparse = (SparseLinear if kind == "linear" else SparseConv2d).from_dense(dense, mask)
    x = torch.randn(4, 1024) if kind == "linear" else torch.randn(2, 128, 6, 6)
    totals = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        model(x).sum().backward()
        opt.step()
        totals[name] = training_memory_bytes(model, opt)["total"]
    assert totals["sparse"] <= bound * totals["dense"], (totals, totals["sparse"] / totals["dense"])


def test_no_dense_weight_is_ever_allocated():
    """Forward and backward of the sparse layer allocate nothing the size of the dense weight (the same layer run
    through its densified weight does: the check can fail)."""
    if not fk.available_backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    out_f, in_f = 1500, 1700
    layer = SparseLinear(in_f, out_f, torch.rand(out_f, in_f) < 0.05)
    x = torch.randn(8, in_f, requires_grad=True)
    dense_bytes = out_f * in_f * 4
    largest = {}
    for backend, forward in (("cpp", layer),
                             ("dense", lambda t: torch.nn.functional.linear(t, layer.weight.dense(), layer.bias))):
        layer.backend = None if backend == "dense" else backend
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            forward(x).sum().backward()
        largest[backend] = max(e.cpu_memory_usage for e in prof.events())
    assert largest["dense"] >= dense_bytes
    assert largest["cpp"] < dense_bytes / 4  # per-op totals of a few nnz-sized buffers


@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_model_trains_like_the_masked_dense_model(backend, device):
    """Same init, same data, SGD with momentum and weight decay: the sparse model and the dense model whose
    weights (and gradients) are masked follow the same trajectory to float64 round-off."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4)).double().to(device)
    masks = {"0": torch.rand(6, 1, 3, 3, device=device) < 0.5, "4": torch.rand(32, 96, device=device) < 0.2,
             "6": torch.rand(4, 32, device=device) < 0.5}
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name).weight.mul_(mask)
    sparse = sparsify(dense, masks, backend=backend)
    data = torch.randn(6, 16, 1, 8, 8, dtype=torch.float64, device=device)
    quadrants = data.reshape(6, 16, 2, 4, 2, 4).sum(dim=(3, 5)).reshape(6, 16, 4)
    labels = quadrants.argmax(dim=-1)  # the brightest quadrant: learnable
    options = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_dense = torch.optim.SGD(dense.parameters(), **options)
    opt_sparse = torch.optim.SGD(sparse.parameters(), **options)
    interpreted = backend == "triton" and device == "cpu"
    steps = 12 if interpreted else 60  # the interpreter is slow; the trajectory check is the same
    first = None
    for step in range(steps):
        losses = []
        for model, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            loss = F.cross_entropy(model(data[step % 6]), labels[step % 6])
            loss.backward()
            if model is dense:
                for name, mask in masks.items():
                    model.get_submodule(name).weight.grad.mul_(mask)
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-9, (step, losses)
        first = losses[1] if first is None else first
    if not interpreted:
        assert losses[1] < 0.8 * first  # and it learns


# ------------------------------------------------------------------------------------------------------------------
# Pooling in the sparse layers' layout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                                      dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                                      dict(kernel_size=3, stride=2, ceil_mode=True),
                                      dict(kernel_size=2, return_indices=True)], ids=str)
@pytest.mark.parametrize("layout", ["batch_innermost", "nchw", "batch_1"])
def test_sparse_layout_max_pool_is_max_pool2d(settings, layout):
    """Same outputs, indices and input gradients as nn.MaxPool2d (ties included: integer-valued inputs), and the
    output in the sparse layers' (C, H, W, N) memory layout."""
    from fedspa.nn import SparseLayoutMaxPool2d, batch_innermost

    batch = 1 if layout == "batch_1" else 5
    base = torch.randint(0, 4, (3, 9, 11, batch)).float()  # many ties
    x = base.permute(3, 0, 1, 2) if layout == "batch_innermost" else base.permute(3, 0, 1, 2).contiguous()
    outs, grads = [], []
    for pool in (nn.MaxPool2d(**settings), SparseLayoutMaxPool2d(**settings)):
        xx = x.detach().clone().requires_grad_()
        out = pool(xx)
        values = out[0] if settings.get("return_indices") else out
        values.backward(torch.arange(values.numel(), dtype=torch.float32).reshape(values.shape))
        outs.append(out)
        grads.append(xx.grad)
    if settings.get("return_indices"):
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        values = outs[1][0]
    else:
        assert torch.equal(outs[0], outs[1])
        values = outs[1]
    assert torch.equal(grads[0], grads[1])
    if batch > 1:
        assert batch_innermost(values)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_sparse_layout_max_pool_returns_the_gradient_in_its_inputs_layout(memory_format):
    """An input in another layout (a dense convolution's NCHW output) is moved into the sparse layers' layout for
    pooling; its gradient must come back in the input's own layout. Left in (C, H, W, N), it reaches the ReLU
    before the pool, whose backward then mixes two layouts in one elementwise op (measured 10 ms instead of 0.8 ms
    at 128 x 32 x 28 x 28, 2 threads)."""
    from fedspa.nn import SparseLayoutMaxPool2d, batch_innermost

    x = torch.randn(6, 5, 8, 8).contiguous(memory_format=memory_format).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    relu_out = torch.relu(x)
    out = SparseLayoutMaxPool2d(2)(relu_out)
    assert batch_innermost(out)
    upstream = torch.randn(out.shape)
    grad_of_pool_input, = torch.autograd.grad(out, relu_out, upstream, retain_graph=True)
    assert grad_of_pool_input.is_contiguous(memory_format=memory_format), grad_of_pool_input.stride()
    out.backward(upstream)
    nn.MaxPool2d(2)(torch.relu(reference)).backward(upstream)
    assert torch.equal(x.grad, reference.grad)


def test_keep_sparse_layout_replaces_the_pools_of_a_model_that_runs_sparse_convolutions():
    from fedspa.nn import SparseLayoutMaxPool2d, apply_masks

    class Pool(nn.MaxPool2d):  # a subclass may do something else: left alone
        pass

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          Pool(2), nn.Flatten(), nn.Linear(4, 3))
    reference = copy.deepcopy(model)
    masks = {"3.weight": torch.rand(4, 4, 3, 3) < 0.3}
    plan = apply_masks(model, masks, sparse=True, sparse_max_density=0.5)
    assert plan == {"3.weight": "sparse"}
    assert type(model[2]) is SparseLayoutMaxPool2d and type(model[4]) is Pool
    with torch.no_grad():
        reference[3].weight.mul_(masks["3.weight"])
    x = torch.randn(6, 2, 4, 4)
    torch.testing.assert_close(model(x), reference(x))
    dense_only = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2))
    apply_masks(dense_only, {"0.weight": torch.rand(4, 2, 3, 3) < 0.3}, sparse=False)
    assert type(dense_only[1]) is nn.MaxPool2d  # no sparse convolution: nothing to keep


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_set_masked_weights_refills_and_moves_every_way_a_weight_runs(kind):
    from fedspa.nn import apply_masks, masked_weight_values, set_masked_weights

    torch.manual_seed(0)
    layer = nn.Linear(12, 6) if kind == "linear" else nn.Conv2d(3, 4, 3)
    model = nn.Sequential(copy.deepcopy(layer), copy.deepcopy(layer), copy.deepcopy(layer))  # weights only, no forward
    shape = layer.weight.shape
    masks = {"0.weight": torch.rand(shape) < 0.3, "1.weight": torch.rand(shape) < 0.3,
             "2.weight": torch.ones(shape, dtype=torch.bool)}
    plan = apply_masks(model, masks, sparse_names={"0.weight"})
    assert plan == {"0.weight": "sparse", "1.weight": "masked", "2.weight": "dense"}
    new_masks = {"0.weight": torch.rand(shape) < 0.3, "1.weight": torch.rand(shape) < 0.3, "2.weight": masks["2.weight"]}
    targets = {n: torch.randn(shape) * m for n, m in new_masks.items()}
    set_masked_weights(model, new_masks, {n: t[new_masks[n]] for n, t in targets.items()},
                       moved=["0.weight", "1.weight"])
    got = masked_weight_values(model, list(masks))
    for name, target in targets.items():
        torch.testing.assert_close(got[name], target)
    assert torch.equal(model[0].mask(), new_masks["0.weight"])
    assert torch.equal(model[1].parametrizations.weight[0].mask, new_masks["1.weight"])
    # not moved: values only, at the masks it runs at
    again = {n: torch.randn(shape) * m for n, m in new_masks.items()}
    set_masked_weights(model, new_masks, {n: t[new_masks[n]] for n, t in again.items()})
    got = masked_weight_values(model, list(masks))
    for name, target in again.items():
        torch.testing.assert_close(got[name], target)
    with pytest.raises(ValueError, match="runs unmasked"):
        set_masked_weights(model, {"2.weight": masks["1.weight"]},
                           {"2.weight": torch.ones(int(masks["1.weight"].sum()))}, moved=["2.weight"])


def test_dense_weight_gradients_equal_a_dense_copy():
    """The dense gradient of every masked weight, computed on the prepared model (sparse conv, sparse linear, a
    masked conv, an unmasked linear), equals the gradient of the densified model; other weights give None."""
    from fedspa.nn import apply_masks, dense_weight_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    masks = {"0.weight": torch.rand(4, 2, 3, 3) < 0.6, "3.weight": torch.rand(6, 4, 3, 3) < 0.3,
             "6.weight": torch.rand(5, 6) < 0.4, "8.weight": torch.ones(3, 5, dtype=torch.bool)}
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_parameter(name).mul_(mask)
    plan = apply_masks(model, masks, sparse_names={"3.weight", "6.weight"})
    assert plan == {"0.weight": "masked", "3.weight": "sparse", "6.weight": "sparse", "8.weight": "dense"}
    x, y = torch.randn(7, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = dense_weight_gradients(model, list(masks), lambda: F.cross_entropy(model(x), y))
    F.cross_entropy(dense(x), y).backward()
    for name in masks:
        torch.testing.assert_close(got[name].reshape(masks[name].shape), dense.get_parameter(name).grad)
        if not bool(masks[name].all()):  # nonzero where the mask is off: a dense gradient
            assert (got[name].reshape(masks[name].shape)[~masks[name]] != 0).any()
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was computed
    embedding = nn.Sequential(nn.Embedding(10, 4))
    assert dense_weight_gradients(embedding, ["0.weight"], lambda: embedding(torch.tensor([1, 2])).sum()) is None
