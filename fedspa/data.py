"""Datasets that can be had offline, non-IID partitions, and each client's own train/test split.

Datasets (all available offline): Fashion-MNIST (the Debian package dataset-fashion-mnist, IDX files), MNIST and
EMNIST (IDX files the user places in a directory), FEMNIST (LEAF's JSON files, one client per writer: the natural
partition), CIFAR-10/100 (the official python pickles, from a directory),
scikit-learn's digits, and the LEAF/FedProx Synthetic(alpha, beta) data. Nothing is downloaded.

Partitions: Dirichlet(alpha) over labels, pathological (n classes per client), IID. Each client's samples are split
into its own train and test sets with the same label mix (stratified), as personalized FL evaluates.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {
    "fashion_mnist": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                      "t10k-labels-idx1-ubyte"),
    "mnist": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"),
    "emnist": ("emnist-balanced-train-images-idx3-ubyte", "emnist-balanced-train-labels-idx1-ubyte",
               "emnist-balanced-test-images-idx3-ubyte", "emnist-balanced-test-labels-idx1-ubyte"),
}
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


@dataclass
class Pool:
    """All samples of a dataset (train and test sets pooled, as partitions resplit them per client)."""

    x: torch.Tensor  # (n, C, H, W) float32 in [0, 1] (images), or (n, features)
    y: torch.Tensor  # (n,) int64
    num_classes: int
    name: str


@dataclass
class ClientData:
    """One client's own data: inputs (any shape and dtype: images, features, token ids) and int64 labels.

    ``test_x`` / ``test_y`` are what the client's personal model is evaluated on: its test split, or with
    ``data.evaluate_on = validation`` a validation split carved from its training data."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_y.numel())

    def to(self, device: torch.device | str) -> ClientData:
        """The same data on `device` (self when it is there already)."""
        device = torch.device(device)
        if all(t.device == device for t in (self.train_x, self.train_y, self.test_x, self.test_y)):
            return self
        return ClientData(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                          self.test_y.to(device))

    def check(self, where: str = "client") -> None:
        """Raises TypeError/ValueError for anything a federation cannot train on."""
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"{where}: {split}_x and {split}_y must be tensors, got {type(x).__name__} and "
                                f"{type(y).__name__}")
            if y.dim() != 1 or y.dtype != torch.int64:
                raise ValueError(f"{where}: {split}_y must be a 1-D int64 tensor of labels, got {y.dtype} of shape "
                                 f"{tuple(y.shape)}")
            if x.dim() < 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{where}: {split}_x has {x.shape[0] if x.dim() else 0} samples but {split}_y "
                                 f"{y.shape[0]}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{where}: {split}_x holds non-finite values")
        if self.num_train < 1:
            raise ValueError(f"{where}: has no training samples")


@dataclass
class FederatedData:
    """A federation's data: one :class:`ClientData` per client (client k is ``clients[k]``).

    Build your own with :meth:`from_tensors` or :meth:`from_datasets`; ``fedspa.train.run(config, data=...)``
    trains on it (the federation then has ``len(clients)`` clients).
    """

    clients: list[ClientData]
    num_classes: int
    description: dict = field(default_factory=dict)  # what the data is (recorded in the run folder)
    partition: dict | None = field(default=None, repr=False)  # which samples each client has (partition.json)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.clients[0].train_x.shape[1:])

    @classmethod
    def from_tensors(cls, train: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     test: Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int | None = None,
                     name: str = "custom") -> FederatedData:
        """From per-client ``(x, y)`` pairs: ``train[k]`` and ``test[k]`` are client k's.

        Args:
            num_classes: default: 1 + the largest label.
        """
        if len(train) != len(test):
            raise ValueError(f"from_tensors: {len(train)} training and {len(test)} test sets; one of each per client")
        clients = [ClientData(tx, ty, vx, vy) for (tx, ty), (vx, vy) in zip(train, test)]
        return cls._made(clients, num_classes, name)

    @classmethod
    def from_datasets(cls, train: Sequence[torch.utils.data.Dataset], test: Sequence[torch.utils.data.Dataset],
                      num_classes: int | None = None, name: str = "custom") -> FederatedData:
        """From per-client map-style datasets yielding ``(x, y)`` (e.g. ``torch.utils.data.Subset`` of a
        torchvision dataset); each client's samples are stacked into tensors once, here."""
        if len(train) != len(test):
            raise ValueError(f"from_datasets: {len(train)} training and {len(test)} test sets; one of each per "
                             "client")

        def stacked(dataset, where):
            if len(dataset) == 0:
                raise ValueError(f"from_datasets: {where} is empty")
            xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
            return (torch.stack([torch.as_tensor(x, device="cpu") for x in xs]),
                    torch.as_tensor([int(y) for y in ys], dtype=torch.int64, device="cpu"))

        clients = [ClientData(*stacked(tr, f"client {k} train"), *stacked(te, f"client {k} test"))
                   for k, (tr, te) in enumerate(zip(train, test))]
        return cls._made(clients, num_classes, name)

    @classmethod
    def _made(cls, clients: list[ClientData], num_classes: int | None, name: str) -> FederatedData:
        if num_classes is None and clients:
            num_classes = 1 + max(int(t.max()) for c in clients for t in (c.train_y, c.test_y) if t.numel())
        data = cls(clients, int(num_classes or 0), {"name": name, "source": "user"})
        data.check()
        return data

    def check(self) -> None:
        """Raises TypeError/ValueError naming the client for anything a federation cannot train on: no clients,
        missing samples, mismatched lengths, labels outside [0, num_classes), inputs of different shapes or dtypes
        across clients, non-finite inputs."""
        if not self.clients:
            raise ValueError("FederatedData needs at least one client")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        first = self.clients[0].train_x
        for k, client in enumerate(self.clients):
            if not isinstance(client, ClientData):
                raise TypeError(f"client {k}: expected ClientData, got {type(client).__name__}")
            client.check(f"client {k}")
            for split in ("train", "test"):
                x, y = getattr(client, f"{split}_x"), getattr(client, f"{split}_y")
                if x.shape[1:] != first.shape[1:] or x.dtype != first.dtype:
                    raise ValueError(f"client {k}: {split}_x is {x.dtype} of per-sample shape {tuple(x.shape[1:])}, "
                                     f"client 0 has {first.dtype} {tuple(first.shape[1:])}")
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                    raise ValueError(f"client {k}: {split}_y has labels outside [0, {self.num_classes}): "
                                     f"{int(y.min())}..{int(y.max())}")

    def describe(self) -> dict:
        """What the run trained on: name, clients, samples, input shape and dtype, classes, and a SHA-256 of every
        client's tensors (so a resumed run can check it has the same data)."""
        digest = hashlib.sha256()
        for client in self.clients:
            for t in (client.train_x, client.train_y, client.test_x, client.test_y):
                digest.update(str((t.dtype, tuple(t.shape))).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {**self.description, "clients": len(self.clients), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "input_dtype": str(self.clients[0].train_x.dtype),
                "train_samples": [c.num_train for c in self.clients],
                "test_samples": [int(c.test_y.numel()) for c in self.clients], "sha256": digest.hexdigest()}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------
FEMNIST_CLASSES = 62  # digits, upper- and lower-case letters
MAX_IDX_BYTES = 1 << 31  # an uncompressed IDX file larger than any image dataset we load is refused, not read


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An unsigned-byte IDX file with `dims` dimensions; its header is checked against its length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)  # bounded even for a gzip bomb
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path} cannot be read as an IDX file: {exc}") from None
    if len(data) > MAX_IDX_BYTES:
        raise ValueError(f"{path} is larger than {MAX_IDX_BYTES} bytes: not an IDX file of this dataset")
    if len(data) < 4 + 4 * dims:
        raise ValueError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, found = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    if found != dims:
        raise ValueError(f"{path} has {found} dimensions, expected {dims}")
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != math.prod(shape):
        raise ValueError(f"{path} holds {array.size} bytes for shape {shape}")
    return array.reshape(shape)


def _numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused an object dtype ({dtype})")
    return dtype


def _latin1_bytes(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into a protocol-2 pickle as _codecs.encode(text, "latin1"); nothing else is admitted
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"refused _codecs.encode with {type(text).__name__}, {encoding!r}, {errors!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
# the globals the official CIFAR pickles name (numpy 1 and 2 module paths); nothing else is ever imported
_CIFAR_GLOBALS = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR files contain: dicts, lists, bytes, str, numbers and numpy arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR file holds only dicts, "
                                         "lists, bytes, strings, numbers and numpy arrays") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: not a CIFAR file")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (images (n, 3072) uint8, labels (n,)), parsed without running any code."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001  (whatever a crafted file raises while parsing is "not a CIFAR file")
        raise ValueError(f"{path} is not a CIFAR python batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR python batch: expected a dict with b'data' and {label_key!r}, "
                         f"got {keys}")
    images, labels = batch[b"data"], batch[label_key]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (n, 3072), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if not isinstance(labels, list) or len(labels) != len(images) or not all(
            type(label) is int and 0 <= label < 100 for label in labels):
        raise ValueError(f"{path}: {label_key!r} must list one integer label in [0, 100) per image "
                         f"({len(images)} images)")
    return images, np.asarray(labels, dtype=np.int64)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _roots(dataset: str, root: str | None) -> list[Path]:
    roots = []
    if root:
        roots.append(Path(root))
    if os.environ.get("FEDSPA_DATA"):
        base = Path(os.environ["FEDSPA_DATA"])
        roots += [base / dataset, base]
    if dataset == "fashion_mnist":
        roots.append(DEBIAN_FASHION_MNIST)
    return roots


def load_idx(dataset: str, root: str | None) -> Pool:
    names = IDX_FILES[dataset]
    searched = _roots(dataset, root)
    for base in searched:
        paths = [_find(base, n) for n in names]
        if all(paths):
            images, labels = [], []
            for image_path, label_path in ((paths[0], paths[1]), (paths[2], paths[3])):
                split_images, split_labels = _read_idx(image_path, 3), _read_idx(label_path, 1)
                if len(split_images) != len(split_labels):
                    raise ValueError(f"{image_path} holds {len(split_images)} images but {label_path} "
                                     f"{len(split_labels)} labels")
                images.append(split_images)
                labels.append(split_labels)
            images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int64)
            x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
            if dataset == "emnist":  # EMNIST images are stored transposed
                x = x.transpose(2, 3).contiguous()
            y = torch.from_numpy(labels)
            return Pool(x, y, int(y.max()) + 1, dataset)
    hint = " (install the Debian package dataset-fashion-mnist)" if dataset == "fashion_mnist" else ""
    raise DatasetNotFoundError(
        f"{dataset}: expected the IDX files {', '.join(n + '[.gz]' for n in names)} in one of "
        f"{', '.join(str(p) for p in searched) or 'data.root / $FEDSPA_DATA'}{hint}")


def load_cifar(dataset: str, root: str | None) -> Pool:
    folder, train_files, test_files, label_key = CIFAR_FILES[dataset]
    searched = []
    for base in _roots(dataset, root):
        for directory in (base / folder, base):
            searched.append(directory)
            paths = [directory / f for f in train_files + test_files]
            if all(p.is_file() for p in paths):
                images, labels = zip(*(_read_cifar_batch(p, label_key) for p in paths))
                x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
                y = torch.from_numpy(np.concatenate(labels))
                return Pool(x, y, int(y.max()) + 1, dataset)
    raise DatasetNotFoundError(
        f"{dataset}: expected the python pickles {folder}/{{{', '.join(train_files + test_files)}}} under "
        f"{', '.join(str(p) for p in searched) or 'data.root / $FEDSPA_DATA'} (the official archive, extracted)")


def load_femnist(root: str | None, clients: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """LEAF's FEMNIST (the JSON files of ``leaf/data/femnist/data/{train,test}/*.json``): the first `clients`
    writers (sorted by id) with their own train and test samples — the natural partition.

    Returns (writer, train_x, train_y, test_x, test_y) per client, images (n, 28, 28) in [0, 1].
    """
    import json

    searched = []
    for base in _roots("femnist", root):
        for directory in (base / "data", base):
            searched.append(directory)
            train_files = sorted((directory / "train").glob("*.json"))
            test_files = sorted((directory / "test").glob("*.json"))
            if not train_files or not test_files:
                continue
            users: dict[str, dict[str, list]] = {}
            for split, files in (("train", train_files), ("test", test_files)):
                for path in files:
                    try:
                        blob = json.loads(path.read_text())
                        for user, data in blob["user_data"].items():
                            users.setdefault(user, {}).setdefault(split, []).append(data)
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ValueError(f"{path} is not a LEAF FEMNIST file: {exc!r}") from None
            complete = sorted(u for u, d in users.items() if "train" in d and "test" in d)
            if len(complete) < clients:
                raise ValueError(f"femnist: {directory} has {len(complete)} writers with train and test data, "
                                 f"{clients} clients were asked for")
            out = []
            for user in complete[:clients]:
                arrays = []
                for split in ("train", "test"):
                    try:
                        x = np.concatenate([np.asarray(d["x"], dtype=np.float32) for d in users[user][split]])
                        y = np.concatenate([np.asarray(d["y"], dtype=np.int64) for d in users[user][split]])
                        x = x.reshape(-1, 28, 28)
                    except (ValueError, KeyError, TypeError, OverflowError) as exc:
                        raise ValueError(f"femnist: writer {user!r}'s {split} data in {directory} is not LEAF's "
                                         f"(x: 784 numbers per image, y: an integer each): {exc}") from None
                    if len(x) != len(y) or not len(y) or y.min() < 0 or y.max() >= FEMNIST_CLASSES or \
                            not np.isfinite(x).all():
                        raise ValueError(f"femnist: writer {user!r}'s {split} data in {directory} needs as many "
                                         f"labels in [0, {FEMNIST_CLASSES}) as images (finite pixels); got "
                                         f"{len(x)} images and {len(y)} labels")
                    arrays += [x, y]
                out.append((user, *arrays))
            return out
    raise DatasetNotFoundError(
        f"femnist: expected LEAF's JSON files (train/*.json and test/*.json) in one of "
        f"{', '.join(str(p) for p in searched) or 'data.root / $FEDSPA_DATA'}")


def load_digits() -> Pool:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Pool(x, torch.tensor(bunch.target, dtype=torch.int64), 10, "digits")


def synthetic(clients: int, alpha: float = 1.0, beta: float = 1.0, dim: int = 60, classes: int = 10,
              samples_per_client: int = 200, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LEAF/FedProx Synthetic(alpha, beta): client k draws a model W_k ~ N(u_k, 1), u_k ~ N(0, alpha), and
    inputs x ~ N(v_k, Sigma), v_k ~ N(B_k, 1), B_k ~ N(0, beta), Sigma_jj = j^-1.2; y = argmax softmax(W_k x + b_k)."""
    rng = np.random.default_rng(seed)
    covariance = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    out = []
    for _ in range(clients):
        u, b_mean = rng.normal(0, alpha), rng.normal(0, beta)
        weights = rng.normal(u, 1, (dim, classes))
        bias = rng.normal(u, 1, classes)
        mean = rng.normal(b_mean, 1, dim)
        x = rng.multivariate_normal(mean, covariance, samples_per_client)
        y = np.argmax(x @ weights + bias, axis=1)
        out.append((torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)))
    return out


def load_pool(config: DataConfig) -> Pool:
    """The dataset named in the config, train and test sets pooled."""
    if config.dataset in IDX_FILES:
        return load_idx(config.dataset, config.root)
    if config.dataset in CIFAR_FILES:
        return load_cifar(config.dataset, config.root)
    if config.dataset == "digits":
        return load_digits()
    raise ValueError(f"load_pool: {config.dataset} is generated per client, not pooled")


# ------------------------------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------------------------------
def partition(labels: np.ndarray, clients: int, config: DataConfig, num_classes: int) -> list[np.ndarray]:
    """Sample indices of each client (disjoint).

    Raises:
        ValueError: a partition that cannot be made (more classes per client than classes, too few samples).
    """
    rng = np.random.default_rng(config.seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    per_client = config.samples_per_client or len(labels) // clients
    if per_client * clients > len(labels):
        raise ValueError(f"data.samples_per_client={per_client} x {clients} clients needs {per_client * clients} "
                         f"samples, the dataset has {len(labels)}: set data.samples_per_client="
                         f"{len(labels) // clients} or less (or null: the whole dataset split evenly), or fewer "
                         f"clients")
    if config.partition == "iid":
        order = rng.permutation(len(labels))
        return [np.sort(order[k * per_client:(k + 1) * per_client]) for k in range(clients)]
    if config.partition == "pathological":
        if config.classes_per_client > num_classes:
            raise ValueError(f"data.classes_per_client={config.classes_per_client} exceeds the {num_classes} classes")
        # every class is given to the same number of clients (as far as possible), each client n distinct classes
        slots = np.concatenate([rng.permutation(num_classes) for _ in range(
            -(-clients * config.classes_per_client // num_classes))])
        proportions = np.zeros((clients, num_classes))
        for k in range(clients):
            chosen: list[int] = []
            for c in slots[k * config.classes_per_client:]:
                if len(chosen) == config.classes_per_client:
                    break
                if c not in chosen:
                    chosen.append(int(c))
            for c in rng.permutation(num_classes):
                if len(chosen) == config.classes_per_client:
                    break
                if c not in chosen:
                    chosen.append(int(c))
            proportions[k, chosen] = 1.0 / len(chosen)
    else:
        proportions = rng.dirichlet(np.full(num_classes, config.alpha), size=clients)
    return _draw(by_class, proportions, per_client, rng)


def _draw(by_class: list[np.ndarray], proportions: np.ndarray, per_client: int,
          rng: np.random.Generator) -> list[np.ndarray]:
    """Each client takes per_client samples with its class proportions, without replacement across clients;
    when a class runs out, the client's remaining need is spread over its other classes."""
    cursor = np.zeros(len(by_class), dtype=np.int64)
    available = np.array([len(c) for c in by_class])
    out = []
    for p in proportions:
        want = np.floor(p * per_client).astype(np.int64)
        want[np.argsort(-(p * per_client - want))[: per_client - want.sum()]] += 1  # largest remainders
        take = np.minimum(want, available - cursor)
        short = per_client - take.sum()
        while short > 0:  # refill from the classes with samples left, in order of the client's preference
            order = [c for c in np.argsort(-p) if available[c] - cursor[c] - take[c] > 0]
            if not order:
                order = [c for c in rng.permutation(len(by_class)) if available[c] - cursor[c] - take[c] > 0]
            if not order:
                raise ValueError("partition: not enough samples left for every client")
            take[order[0]] += 1
            short -= 1
        chosen = [by_class[c][cursor[c]:cursor[c] + take[c]] for c in range(len(by_class))]
        cursor += take
        out.append(np.sort(np.concatenate(chosen)))
    return out


def _split(indices: np.ndarray, labels: np.ndarray, test_fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: every class of the client contributes test_fraction of its samples to the test split."""
    train, test = [], []
    for c in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == c])
        n_test = int(round(test_fraction * len(members)))
        if len(members) > 1:
            n_test = min(max(n_test, 1), len(members) - 1)
        else:
            n_test = 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _evaluation_split(train: np.ndarray, test: np.ndarray, labels: np.ndarray, config: DataConfig,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(training samples, evaluated samples, partition record) of one client: its test split, or with
    ``evaluate_on = validation`` a stratified validation_fraction of its training samples (the test split is then
    set aside and never read)."""
    if config.evaluate_on != "validation":
        return train, test, {"train": train.tolist(), "test": test.tolist()}
    kept, validation = _split(train, labels, config.validation_fraction, rng)
    return kept, validation, {"train": kept.tolist(), "validation": validation.tolist(), "test": test.tolist()}


# what each dataset is, without loading it: (input shape, classes)
DATASET_INFO = {
    "fashion_mnist": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "emnist": ((1, 28, 28), 47),
    "femnist": ((1, 28, 28), 62), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
    "digits": ((1, 8, 8), 10), "synthetic": ((60,), 10),
}


def dataset_info(config: DataConfig) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of the configured dataset, without reading it (a server needs no data)."""
    if config.dataset not in DATASET_INFO:
        raise ValueError(f"data.dataset={config.dataset!r} has no built-in description; pass the data itself")
    return DATASET_INFO[config.dataset]


def federated_data(config: DataConfig, clients: int, only: int | None = None) -> FederatedData:
    """Every client's train/test data from the config (or, with `only`, client `only`'s alone: the partition is
    computed from the labels and only that client's samples are kept, as a node of a real deployment would).

    Raises:
        DatasetNotFoundError: the files are missing; ValueError: a partition that cannot be made.
    """
    if only is not None and not 0 <= only < clients:
        raise ValueError(f"client {only} is not one of the {clients} clients")
    input_shape, num_classes = dataset_info(config)
    rng = np.random.default_rng(config.seed + 1)
    validation_rng = np.random.default_rng(config.seed + 2)  # its own: the test splits stay those of evaluate_on=test
    keep = (lambda k: True) if only is None else (lambda k: k == only)
    out, record = [], {"dataset": config.dataset, "partition": config.partition,
                       "evaluated_on": config.evaluate_on, "clients": []}
    if config.dataset == "synthetic":
        parts = synthetic(clients, samples_per_client=config.samples_per_client or 200, seed=config.seed)
        record["partition"] = "synthetic"
        for k, (x, y) in enumerate(parts):
            idx = np.arange(len(y))
            train, test = _split(idx, y.numpy(), config.test_fraction, rng)
            train, evaluated, entry = _evaluation_split(train, test, y.numpy(), config, validation_rng)
            if keep(k):
                out.append(ClientData(x[train], y[train], x[evaluated], y[evaluated]))
            record["clients"].append(entry)
    elif config.dataset == "femnist":
        writers = load_femnist(config.root, clients)
        for k, w in enumerate(writers):
            train_x, train_y, test_x, test_y = (torch.from_numpy(a).unsqueeze(1) if a.ndim == 3 else
                                                torch.from_numpy(a) for a in w[1:])
            entry = {"writer": w[0]}
            if config.evaluate_on == "validation":  # the writer's own test samples are set aside
                train, validation = _split(np.arange(len(train_y)), train_y.numpy(), config.validation_fraction,
                                           validation_rng)
                train_x, train_y, test_x, test_y = train_x[train], train_y[train], train_x[validation], \
                    train_y[validation]
                entry.update({"train": train.tolist(), "validation": validation.tolist()})
            if keep(k):
                out.append(ClientData(train_x, train_y, test_x, test_y))
            record["clients"].append(entry)
    else:
        pool = load_pool(config)
        labels = pool.y.numpy()
        if labels.size and int(labels.max()) >= num_classes:
            raise ValueError(f"{config.dataset}: labels up to {int(labels.max())}, the dataset has {num_classes} "
                             "classes")
        for k, indices in enumerate(partition(labels, clients, config, num_classes)):
            train, test = _split(indices, labels, config.test_fraction, rng)
            train, evaluated, entry = _evaluation_split(train, test, labels, config, validation_rng)
            if keep(k):
                out.append(ClientData(pool.x[train], pool.y[train], pool.x[evaluated], pool.y[evaluated]))
            record["clients"].append(entry)
        del pool
    if out and tuple(out[0].train_x.shape[1:]) != input_shape:
        raise ValueError(f"{config.dataset}: samples of shape {tuple(out[0].train_x.shape[1:])}, expected "
                         f"{input_shape}")
    description = {"name": config.dataset, "source": "config", "partition": record["partition"],
                   "evaluated_on": config.evaluate_on}
    return FederatedData(out, num_classes, description, record)


def label_counts(clients: list[ClientData], num_classes: int) -> np.ndarray:
    """(clients x classes) training-label counts."""
    return np.stack([np.bincount(c.train_y.cpu().numpy(), minlength=num_classes) for c in clients])


def plot_label_distribution(clients: list[ClientData], num_classes: int, path: str | Path,
                            title: str = "label distribution per client") -> None:
    """A stacked bar chart of each client's training labels, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_counts(clients, num_classes)
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(clients)), 4))
    bottom = np.zeros(len(clients))
    cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
    for c in range(num_classes):
        ax.bar(np.arange(len(clients)), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
    from matplotlib.ticker import MaxNLocator

    if len(clients) <= 30:
        ax.set_xticks(range(len(clients)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title(title, fontsize="medium")
    if num_classes <= 20:
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
