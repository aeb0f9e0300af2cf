"""Offline datasets, non-IID partitions, per-client stratified splits, clear errors for missing files."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fedspa.config import DataConfig
from fedspa.data import (DatasetNotFoundError, federated_data, label_counts, load_cifar, load_idx, partition,
                         plot_label_distribution)


def _labels(n_per_class=100, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("kind", ["dirichlet", "pathological", "iid"])
def test_partitions_are_disjoint_sized_and_reproducible(kind):
    labels = _labels()
    config = DataConfig(partition=kind, alpha=0.3, classes_per_client=2, samples_per_client=80, seed=3)
    parts = partition(labels, 10, config, 10)
    again = partition(labels, 10, config, 10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert all(len(p) == 80 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    if kind == "pathological":
        assert all(len(np.unique(labels[p])) == 2 for p in parts)
    if kind == "dirichlet":  # alpha = 0.3 concentrates: most clients are dominated by few classes
        top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
        assert np.median(top_share) > 0.3
    other = partition(labels, 10, DataConfig(partition=kind, classes_per_client=2, samples_per_client=80, seed=4), 10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_partition_errors():
    labels = _labels(10)
    with pytest.raises(ValueError, match="needs 2000 samples, the dataset has 100"):
        partition(labels, 10, DataConfig(samples_per_client=200), 10)
    with pytest.raises(ValueError, match="classes_per_client=11 exceeds the 10 classes"):
        partition(labels, 2, DataConfig(partition="pathological", classes_per_client=11, samples_per_client=5), 10)


def test_each_client_has_a_stratified_test_split_and_the_plot_is_written(tmp_path):
    config = DataConfig(dataset="digits", partition="dirichlet", alpha=0.5, samples_per_client=150, test_fraction=0.2)
    data = federated_data(config, 6)
    clients, classes, shape, record = data.clients, data.num_classes, data.input_shape, data.partition
    assert (classes, shape, len(clients), len(record["clients"])) == (10, (1, 8, 8), 6, 6)
    for c in clients:
        assert c.num_train + c.test_y.numel() == 150
        assert c.train_x.dtype == torch.float32 and 0 <= c.train_x.min() and c.train_x.max() <= 1
        train_share = np.bincount(c.train_y.numpy(), minlength=10) / c.num_train
        test_share = np.bincount(c.test_y.numpy(), minlength=10) / c.test_y.numel()
        assert np.abs(train_share - test_share).max() < 0.2  # same label mix
        assert set(c.test_y.tolist()) <= set(c.train_y.tolist())
    assert label_counts(clients, 10).sum() == sum(c.num_train for c in clients)
    plot_label_distribution(clients, 10, tmp_path / "labels.png")
    assert (tmp_path / "labels.png").stat().st_size > 1000


def test_synthetic_data_per_client():
    data = federated_data(DataConfig(dataset="synthetic", samples_per_client=100), 4)
    clients, classes, shape = data.clients, data.num_classes, data.input_shape
    assert classes == 10 and shape == (60,) and len(clients) == 4
    assert all(c.num_train + c.test_y.numel() == 100 for c in clients)


def test_idx_files_from_a_directory(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    pool = load_idx("mnist", str(tmp_path))
    assert pool.x.shape == (40, 1, 28, 28) and pool.y.shape == (40,) and float(pool.x.max()) <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09abc"))
    with pytest.raises(ValueError, match="holds 3 bytes for shape"):
        load_idx("mnist", str(tmp_path))


@pytest.mark.parametrize(("labels_file", "message"), [
    (b"\0\0\x08\x01\0\0", "too short to be an IDX file"),  # the header announces a dimension it cuts off
    (b"\0\0\x08\x03\0\0\0\x01\0\0\0\x01\0\0\0\x01a", "has 3 dimensions, expected 1"),
    (b"\0\0\x0d\x01\0\0\0\x01abcd", "not an unsigned-byte IDX file"),
    (b"\0\0\x08\x01\0\0\0\x03abc", "holds 10 images but"),  # fewer labels than images
    (b"\x1f\x8b\x08\0garbage", "cannot be read as an IDX file"),  # a corrupt gzip stream
])
def test_crafted_idx_file_is_a_clear_error(labels_file, message, tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        labels_file if labels_file.startswith(b"\x1f\x8b") else gzip.compress(labels_file))
    with pytest.raises(ValueError, match=message):
        load_idx("mnist", str(tmp_path))


CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_cifar10(folder, batch=None):
    """Batches laid out as the official archive's (protocol 2, as Python 2's cPickle wrote them)."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_BATCHES:
        content = batch if batch is not None else {
            b"batch_label": b"training batch", b"labels": [0, 1, 2, 9],
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)


def test_cifar_pickles_from_a_directory(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    pool = load_cifar("cifar10", str(tmp_path))
    assert pool.x.shape == (24, 3, 32, 32) and pool.num_classes == 10


class _RunsCode:
    """What a crafted pickle carries: unpickling it calls os.system (here: creates a file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("payload", ["code_at_top_level", "code_inside_the_batch_dict", "torch_tensor"])
def test_crafted_cifar_pickle_cannot_run_code(payload, tmp_path):
    marker = tmp_path / "code-ran"
    batch = {"code_at_top_level": _RunsCode(marker),
             "code_inside_the_batch_dict": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_RunsCode(marker)]},
             "torch_tensor": {b"data": torch.zeros(1, 3072, dtype=torch.uint8), b"labels": [0]}}[payload]
    _write_cifar10(tmp_path / "cifar-10-batches-py", batch)
    with pytest.raises(ValueError, match="is not a CIFAR python batch.*refused to load"):
        load_cifar("cifar10", str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(("batch", "message"), [
    ([1, 2, 3], "expected a dict with b'data'"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "must be a uint8 array of shape"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "must be a uint8 array of shape"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "one integer label in"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "one integer label in"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "cat"]}, "one integer label in"),
    ({b"data": np.zeros((2, 3072), object), b"labels": [0, 1]}, "refused an object dtype"),
])
def test_malformed_cifar_batch_is_a_clear_error(batch, message, tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py", batch)
    with pytest.raises(ValueError, match=message):
        load_cifar("cifar10", str(tmp_path))


def test_truncated_cifar_pickle_is_a_clear_error(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        load_cifar("cifar10", str(tmp_path))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "mnist", "emnist"])
def test_missing_files_give_a_clear_error(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSPA_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=f"{dataset}: expected the .* {tmp_path}"):
        federated_data(DataConfig(dataset=dataset, root=str(tmp_path)), 4)


def test_femnist_leaf_json_gives_one_client_per_writer(tmp_path):
    import json

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        (tmp_path / split).mkdir()
        blob = {"users": ["w2", "w1", "w3"], "user_data": {
            u: {"x": rng.random((n, 784)).tolist(), "y": rng.integers(0, 62, n).tolist()} for u in ("w2", "w1", "w3")}}
        (tmp_path / split / "all_data_0.json").write_text(json.dumps(blob))
    config = DataConfig(dataset="femnist", partition="natural", root=str(tmp_path))
    data = federated_data(config, 2)
    clients, classes, shape, record = data.clients, data.num_classes, data.input_shape, data.partition
    assert (classes, shape) == (62, (1, 28, 28))
    assert [c["writer"] for c in record["clients"]] == ["w1", "w2"]
    assert clients[0].train_x.shape == (6, 1, 28, 28) and clients[0].test_y.shape == (2,)
    with pytest.raises(ValueError, match="has 3 writers with train and test data, 5 clients were asked for"):
        federated_data(config, 5)
    (tmp_path / "test" / "all_data_0.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a LEAF FEMNIST file"):
        federated_data(config, 2)


def test_femnist_needs_the_natural_partition():
    from fedspa.config import ExperimentConfig

    with pytest.raises(ValueError, match="data.partition=natural .* goes with data.dataset=femnist"):
        ExperimentConfig.load(None, ["data.dataset=femnist"])
    with pytest.raises(ValueError, match="data.partition=natural"):
        ExperimentConfig.load(None, ["data.partition=natural"])


@pytest.mark.parametrize(("x", "y", "message"), [
    ([[0.5] * 784, [0.5] * 100], [1, 2], "is not LEAF's"),  # ragged images
    ([[0.5] * 784] * 2, [1], "needs as many labels"),  # fewer labels than images
    ([[0.5] * 784] * 2, [1, 62], "needs as many labels in \\[0, 62\\)"),
    ([[0.5] * 784] * 2, [1, "a"], "is not LEAF's"),
    ([[0.5] * 783] * 2, [1, 2], "is not LEAF's"),
])
def test_malformed_femnist_writer_data_is_a_clear_error(x, y, message, tmp_path):
    import json

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        blob = {"users": ["w1"], "user_data": {"w1": {"x": x, "y": y}}}
        (tmp_path / split / "all_data_0.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=message):
        federated_data(DataConfig(dataset="femnist", partition="natural", root=str(tmp_path)), 1)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_evaluate_on_validation_carves_from_training_data_and_never_reads_the_test_split(dataset):
    common = dict(dataset=dataset, partition="dirichlet", alpha=0.5, samples_per_client=150, test_fraction=0.2)
    tested = federated_data(DataConfig(**common), 5)
    validated = federated_data(DataConfig(**common, evaluate_on="validation", validation_fraction=0.25), 5)
    assert validated.description["evaluated_on"] == "validation" and tested.description["evaluated_on"] == "test"
    for k, (t, v) in enumerate(zip(tested.clients, validated.clients)):
        record = validated.partition["clients"][k]
        # the validation samples come out of the client's training samples; the test split is left alone
        assert sorted(record["train"] + record["validation"]) == tested.partition["clients"][k]["train"]
        assert record["test"] == tested.partition["clients"][k]["test"]
        assert not set(record["validation"]) & set(record["test"])
        assert v.num_train + v.test_y.numel() == t.num_train
        assert abs(v.test_y.numel() - 0.25 * t.num_train) <= len(np.unique(t.train_y.numpy()))  # per-class rounding
        # what the client evaluates on is none of its test samples, and none of what it trains on
        test_rows = {tuple(row.tolist()) for row in t.test_x.reshape(len(t.test_x), -1)}
        train_rows = {tuple(row.tolist()) for row in v.train_x.reshape(len(v.train_x), -1)}
        evaluated = [tuple(row.tolist()) for row in v.test_x.reshape(len(v.test_x), -1)]
        assert not any(row in test_rows or row in train_rows for row in evaluated)


def test_validation_settings_are_checked():
    from fedspa.config import ExperimentConfig

    with pytest.raises(ValueError, match="data.evaluate_on must be one of test, validation; got 'train'"):
        ExperimentConfig.load(None, ["data.evaluate_on=train"])
    with pytest.raises(ValueError, match=r"data.validation_fraction must lie in \(0, 1\), got 0.0"):
        ExperimentConfig.load(None, ["data.evaluate_on=validation", "data.validation_fraction=0"])
