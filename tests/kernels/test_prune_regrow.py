"""fedspa::prune_regrow: every backend gives exactly the reference's masks, on fresh inputs with many ties."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk
from tests.helpers import backend_device_params

PARAMS = backend_device_params("prune_regrow")
# very different sizes: a 10-element bias, conv kernels, a 2-D weight, odd lengths
SHAPES = [(10,), (16, 3, 3, 3), (70, 90), (1001,), (7,), (3, 5, 40)]


def _model(shapes, density, *, ties=False, dtype=torch.float32, score_dtype=None, device="cpu"):
    weights, masks, scores = [], [], []
    for shape in shapes:
        if ties:  # integer-valued weights and scores: many equal keys
            w = torch.randint(-3, 4, shape).to(dtype)
            s = torch.randint(0, 4, shape).to(score_dtype or dtype)
        else:
            w = torch.randn(shape).to(dtype)
            s = torch.randn(shape).to(score_dtype or dtype)
        weights.append(w.to(device))
        masks.append((torch.rand(shape) < density).to(device))
        scores.append(s.to(device))
    return weights, masks, scores


def _counts(masks, fraction):
    return [min(int(round(fraction * int(m.sum()))), int((~m).sum())) for m in masks]


def _same(a: fk.PruneRegrowResult, b: fk.PruneRegrowResult) -> None:
    for name in ("masks", "pruned", "regrown"):
        for layer, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(x.cpu(), y.cpu()), f"{name} of layer {layer} differ"


def _check_invariants(weights, masks, scores, counts, result):
    for w, m, s, k, new, pruned, grown in zip(weights, masks, scores, counts, *result):
        flat_m, flat_new = m.reshape(-1).cpu(), new.reshape(-1).cpu()
        pruned, grown = pruned.cpu(), grown.cpu()
        assert new.shape == m.shape and new.dtype == torch.bool
        assert int(flat_new.sum()) == int(flat_m.sum())  # nnz preserved
        assert pruned.numel() == k and grown.numel() == k
        assert torch.all(pruned[1:] > pruned[:-1]) and torch.all(grown[1:] > grown[:-1])  # ascending, unique
        assert flat_m[pruned].all() and not flat_new[pruned].any()
        assert not flat_m[grown].any() and flat_new[grown].all()
        assert torch.equal(flat_new, (flat_m & ~torch.isin(torch.arange(m.numel()), pruned)) |
                           torch.isin(torch.arange(m.numel()), grown))
        magnitude = w.reshape(-1).double().abs().cpu()
        score = s.reshape(-1).double().cpu()
        kept = flat_m & flat_new
        if k and kept.any():
            assert magnitude[pruned].max() <= magnitude[kept].min()  # the smallest |w| went
        other = ~flat_m & ~flat_new
        if k and other.any():
            assert score[grown].min() >= score[other].max()  # the largest scores came


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_identical_masks_to_reference(backend, device, dtype, density, ties):
    weights, masks, scores = _model(SHAPES, density, ties=ties, dtype=dtype, device=device)
    counts = _counts(masks, 0.3)
    reference = fk.prune_regrow(weights, masks, scores, counts, backend="reference", return_indices=True)
    got = fk.prune_regrow(weights, masks, scores, counts, backend=backend, return_indices=True)
    _same(got, reference)
    _check_invariants(weights, masks, scores, counts, got)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_large_layers_and_mixed_dtypes(backend, device):
    """Layers spanning many chunks/blocks next to tiny ones; fp32 weights with fp64 scores (64-bit keys)."""
    big = [(10,), (300, 700), (64,), (70001,)]
    if backend == "triton" and device == "cpu":
        big = [(10,), (60, 70), (64,), (3001,)]
    for score_dtype in (torch.float32, torch.float64):
        weights, masks, scores = _model(big, 0.5, dtype=torch.float32, score_dtype=score_dtype, device=device)
        counts = _counts(masks, 0.1)
        reference = fk.prune_regrow(weights, masks, scores, counts, backend="reference", return_indices=True)
        _same(fk.prune_regrow(weights, masks, scores, counts, backend=backend, return_indices=True), reference)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_edge_counts(backend, device):
    w = torch.randn(12, device=device)
    s = torch.rand(12, device=device)
    m = torch.tensor([1, 0] * 6, dtype=torch.bool, device=device)
    dense = torch.ones(5, dtype=torch.bool, device=device)
    for k in (0, 6):  # nothing, and every active weight (and every inactive position)
        result = fk.prune_regrow([w, torch.randn(5, device=device)], [m, dense], [s, torch.rand(5, device=device)],
                                 [k, 0], backend=backend, return_indices=True)
        _same(result, fk.prune_regrow([w, torch.randn(5, device=device)], [m, dense],
                                      [s, torch.rand(5, device=device)], [k, 0], backend="reference",
                                      return_indices=True))
        assert torch.equal(result.masks[1], dense)  # a dense layer with k = 0 stays as it is
        if k == 6:
            assert torch.equal(result.masks[0].cpu(), ~m.cpu())
    empty = fk.prune_regrow([torch.zeros(0, device=device)], [torch.zeros(0, dtype=torch.bool, device=device)],
                            [torch.zeros(0, device=device)], [0], backend=backend)
    assert empty[0].shape == (0,)
    assert fk.prune_regrow([], [], [], [], backend=backend) == []


@pytest.mark.parametrize("backend,device", PARAMS)
def test_ties_and_signed_zeros_break_by_lowest_index(backend, device):
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, 1.0, -1.0, 0.0, 0.0], device=device)
    m = torch.tensor([True, True, True, True, True, True, False, False], device=device)
    s = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.0, 0.0], device=device)
    result = fk.prune_regrow([w], [m], [s], [2], backend=backend, return_indices=True)
    assert result.pruned[0].tolist() == [0, 1]  # |w| = 1 at 0, 1, 2, 4, 5: the two lowest positions
    assert result.regrown[0].tolist() == [6, 7]  # -0 and +0 tie
    result = fk.prune_regrow([w], [m], [s], [1], backend=backend, return_indices=True)
    assert result.pruned[0].tolist() == [0] and result.regrown[0].tolist() == [6]


@pytest.mark.parametrize("backend,device", PARAMS)
def test_noncontiguous_inputs_and_shapes(backend, device):
    w = torch.randn(20, 30, device=device).t()  # (30, 20), transposed
    m = (torch.rand(20, 30, device=device) < 0.4).t()
    s = torch.rand(20, 30, device=device).t()
    got = fk.prune_regrow([w], [m], [s], [25], backend=backend, return_indices=True)
    reference = fk.prune_regrow([w.contiguous()], [m.contiguous()], [s.contiguous()], [25], backend="reference",
                                return_indices=True)
    _same(got, reference)
    assert got.masks[0].shape == (30, 20)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_input(backend, device):
    w = torch.randn(6, device=device)
    m = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool, device=device)
    s = torch.rand(6, device=device)
    with pytest.raises(ValueError, match="layer 0 drops 4 weights but has only 3 active"):
        fk.prune_regrow([w], [m], [s], [4], backend=backend)
    with pytest.raises(ValueError, match="layer 1 regrows 2 weights but has only 1 inactive positions"):
        fk.prune_regrow([w, w[:3]], [m, m[:3]], [s, s[:3]], [1, 2], backend=backend)
    with pytest.raises(ValueError, match="layer 0 drop count must be >= 0, got -1"):
        fk.prune_regrow([w], [m], [s], [-1], backend=backend)
    with pytest.raises(ValueError, match="has weights"):
        fk.prune_regrow([w], [m[:5]], [s], [1], backend=backend)
    with pytest.raises(TypeError, match="layer 0 mask must be bool"):
        fk.prune_regrow([w], [m.float()], [s], [1], backend=backend)
    with pytest.raises(TypeError, match="layer 0 weights must be floating"):
        fk.prune_regrow([w.long()], [m], [s], [1], backend=backend)
    with pytest.raises(ValueError, match="one of each per layer"):
        fk.prune_regrow([w], [m], [s], [1, 2], backend=backend)
    with pytest.raises(ValueError, match="layer 0 drop count 1099511627776 exceeds its 6 positions"):
        fk.prune_regrow([w], [m], [s], [2**40], backend=backend)  # refused before anything is allocated
    with pytest.raises(TypeError, match="layer 0 drop count must be an integer, got 2.7"):
        fk.prune_regrow([w], [m], [s], [2.7], backend=backend)  # never truncated to 2
    with pytest.raises(TypeError, match="layer 0 drop count must be an integer, got True"):
        fk.prune_regrow([w], [m], [s], [True], backend=backend)
    assert fk.prune_regrow([w], [m], [s], [2.0], backend=backend)[0].sum() == 3  # an integral float is fine
    nan_w = w.clone()
    nan_w[5] = float("nan")
    with pytest.raises(ValueError, match="layer 0 has a NaN weight at active position 5"):
        fk.prune_regrow([nan_w], [m], [s], [1], backend=backend)
    nan_s = s.clone()
    nan_s[3] = float("nan")
    with pytest.raises(ValueError, match="layer 0 has a NaN score at inactive position 3"):
        fk.prune_regrow([w], [m], [nan_s], [1], backend=backend)
    # NaN where it is not ranked is fine: a weight at an inactive position, a score at an active one
    ok_w, ok_s = w.clone(), s.clone()
    ok_w[2] = float("nan")
    ok_s[0] = float("nan")
    fk.prune_regrow([ok_w], [m], [ok_s], [1], backend=backend)


def test_device_mismatch():
    w = torch.randn(4)
    with pytest.raises(ValueError, match="all must be on cpu"):
        fk.prune_regrow([w], [torch.ones(4, dtype=torch.bool, device="meta")], [w], [0])


@pytest.mark.parametrize("backend,device", PARAMS)
def test_opcheck(backend, device):
    if backend == "reference":
        pytest.skip("the reference is the op's default kernel, checked through the native ones")
    op = torch.ops.fedspa.prune_regrow_triton if backend == "triton" else torch.ops.fedspa.prune_regrow
    weights, masks, scores = _model([(10,), (4, 6)], 0.5, device=device)
    torch.library.opcheck(op, (weights, masks, scores, _counts(masks, 0.3)))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_the_raw_op_bounds_the_counts_before_allocating(backend, device):
    if backend == "reference":
        pytest.skip("the reference is the op's default kernel, checked through the native ones")
    op = torch.ops.fedspa.prune_regrow_triton if backend == "triton" else torch.ops.fedspa.prune_regrow
    w = torch.randn(8, device=device)
    with pytest.raises(ValueError, match="layer 0 drop count 1099511627776 exceeds its 8 positions"):
        op([w], [w > 0], [w], [2**40])


def test_drop_counts_as_tensor_and_plain_masks():
    weights, masks, scores = _model([(50,), (8, 8)], 0.5)
    counts = torch.tensor(_counts(masks, 0.2))
    plain = fk.prune_regrow(weights, masks, scores, counts)
    assert isinstance(plain, list) and len(plain) == 2 and plain[1].shape == (8, 8)
