"""ERK/uniform densities and personalized random masks."""

from __future__ import annotations

import math

import pytest
import torch

from fedspa.masks import client_generator, density_of, layer_densities, maskable_parameters, random_masks
from fedspa.models import CNN, MLP, ResNet18

SHAPES = {"conv1": (32, 1, 5, 5), "conv2": (64, 32, 5, 5), "fc1": (512, 3136), "fc2": (10, 512)}


def _overall(shapes, densities):
    return sum(densities[n] * math.prod(s) for n, s in shapes.items()) / sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("method", ["erk", "uniform"])
def test_densities_keep_the_global_budget(density, method):
    densities = layer_densities(SHAPES, density, method)
    assert all(0 < d <= 1 for d in densities.values())
    assert _overall(SHAPES, densities) == pytest.approx(density, rel=1e-9)
    if method == "uniform":
        assert set(densities.values()) == {density}


def test_erk_is_proportional_to_dims_over_size_and_makes_small_layers_dense():
    densities = layer_densities(SHAPES, 0.1, "erk")
    assert densities["conv1"] == 1.0  # (32+1+5+5)/800 is far above the rest: capped, dense
    sparse = [n for n in SHAPES if densities[n] < 1]
    ratio = {n: densities[n] / (sum(SHAPES[n]) / math.prod(SHAPES[n])) for n in sparse}
    assert max(ratio.values()) == pytest.approx(min(ratio.values()), rel=1e-9)  # one common scale


def test_bad_density_and_method():
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        layer_densities(SHAPES, 0.0)
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 1.2"):
        layer_densities(SHAPES, 1.2)
    with pytest.raises(ValueError, match="unknown mask init 'magnitude'"):
        layer_densities(SHAPES, 0.5, "magnitude")


def test_random_masks_have_exact_nnz_differ_per_client_and_repeat_per_seed():
    densities = layer_densities(SHAPES, 0.1, "erk")
    a = random_masks(SHAPES, densities, client_generator(0, 1))
    b = random_masks(SHAPES, densities, client_generator(0, 2))
    again = random_masks(SHAPES, densities, client_generator(0, 1))
    for name, shape in SHAPES.items():
        assert a[name].shape == shape and a[name].dtype == torch.bool
        assert int(a[name].sum()) == max(1, round(densities[name] * math.prod(shape)))
        assert torch.equal(a[name], again[name])
    assert not torch.equal(a["fc1"], b["fc1"])
    assert density_of(a) == pytest.approx(0.1, abs=1e-3)


def test_maskable_parameters_of_the_models():
    assert list(maskable_parameters(MLP((1, 8, 8), 10, 4))) == ["net.1.weight", "net.3.weight", "net.5.weight"]
    assert list(maskable_parameters(CNN((1, 28, 28), 10, 8))) == [
        "features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
    shapes = maskable_parameters(ResNet18((3, 32, 32), 10))
    assert len(shapes) == 21 and all(len(s) in (2, 4) for s in shapes.values())  # 20 convs + fc; norms excluded
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(11.2e6, rel=0.01)


def test_every_weight_of_two_or_more_dimensions_is_maskable():
    """Depthwise convs, Embedding and MultiheadAttention's packed projection are masked like any weight."""
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(20, 8), "attn": torch.nn.MultiheadAttention(8, 2),
                                 "dw": torch.nn.Conv2d(8, 8, 3, groups=8), "norm": torch.nn.LayerNorm(8)})
    assert list(maskable_parameters(model)) == ["embed.weight", "attn.in_proj_weight", "attn.out_proj.weight",
                                                "dw.weight"]
