"""Typed config: defaults, files, overrides, and clear errors for bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedspa.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_match_the_default_file():
    default = ExperimentConfig().validate()
    assert ExperimentConfig.load(REPO / "configs" / "default.yaml") == default
    paper = ExperimentConfig.load(REPO / "configs" / "paper_cifar10.yaml")
    assert (paper.clients, paper.rounds, paper.fedspa.density, paper.model.name) == (100, 500, 0.5, "resnet18")


def test_yaml_json_round_trip_and_overrides(tmp_path):
    config = ExperimentConfig.load(None, ["rounds=7", "fedspa.density=0.25", "data.dataset=digits",
                                          "data.samples_per_client=null", "progress=false"])
    assert (config.rounds, config.fedspa.density, config.data.dataset) == (7, 0.25, "digits")
    assert config.data.samples_per_client is None and config.progress is False
    config.save(tmp_path / "c.yaml")
    assert ExperimentConfig.load(tmp_path / "c.yaml") == config
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert ExperimentConfig.load(tmp_path / "c.json") == config
    assert ExperimentConfig.load(tmp_path / "c.yaml", ["rounds=3"]).rounds == 3
    assert ExperimentConfig.load(None, ["lr=1"]).lr == 1.0  # an int where a float is expected


@pytest.mark.parametrize("override,message", [
    ("fedspa.density=0", r"fedspa.density must lie in \(0, 1\], got 0.0"),
    ("fedspa.density=1.5", r"fedspa.density must lie in \(0, 1\], got 1.5"),
    ("fedspa.density=-0.1", r"fedspa.density must lie in \(0, 1\]"),
    ("data.dataset=imagenet", "data.dataset must be one of .*; got 'imagenet'"),
    ("algorithm=fedbogus", "algorithm must be one of"),
    ("model.name=vgg", "model.name must be one of"),
    ("rounds=0", "rounds must be an integer >= 1, got 0"),
    ("rounds=2.5", r"rounds has the wrong type: 2.5"),
    ("client_fraction=0", r"client_fraction must lie in \(0, 1\]"),
    ("data.alpha=0", "data.alpha must be > 0"),
    ("data.test_fraction=1", r"data.test_fraction must lie in \(0, 1\)"),
    ("fedspa.execution=gpu", "fedspa.execution must be one of sparse, dense_masked"),
    ("lr=-1", "lr must be > 0"),
    ("bogus=1", "unknown config key"),
    ("fedspa.nonsense=1", r"unknown config key\(s\) fedspa.nonsense"),
    ("rounds", "must look like key=value"),
    ("rounds=null", "rounds must not be null"),
    ("data=3", "data must be a mapping"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.load(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExperimentConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        ExperimentConfig.load(tmp_path / "list.yaml")
