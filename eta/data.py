"""Data sets and their three splits: train (phase 1, teacher training, finetuning), proxy (phase 2's
quick accuracy of stitched students) and test (the reported front).

Images stay at their native size and are resized per batch, so one split serves every resolution of
elastic-resolution training without re-reading anything. Items are raw images in [0, 1];
normalisation happens in :func:`batches` with the statistics of the training split, which every
split carries as ``mean``/``std``. Small data sets live in memory as ``uint8`` tensors (4x smaller
than float) and are batched by tensor indexing; image folders are read lazily, one file per item.
The proxy split is a stratified fraction of the training split and is removed from it, so phase 2
never scores students on images phase 1 trained them on.
"""
from __future__ import annotations

import gzip
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, default_collate

from .errors import EtaError

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "image_folder")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGE_FOLDER_SIZE = 224  # image folders are decoded at this square size; batches() resizes from it
DIGITS_TEST_SEED = 0  # the digits test split is the same for every run seed, so fronts compare


class InMemoryImages(Dataset):
    """Images (N, C, H, W) stored as integers in ``[0, value_scale]``, labels, normalisation statistics.

    Items are float images in [0, 1]; :func:`batches` indexes whole batches at once instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, value_scale: float,
                 mean: tuple = (0.0,), std: tuple = (1.0,)):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.value_scale = images, labels.long(), float(value_scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / self.value_scale, self.labels[i]

    def subset(self, idx) -> "InMemoryImages":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return InMemoryImages(self.images[idx], self.labels[idx], value_scale=self.value_scale, mean=self.mean, std=self.std)


class LazyImages(Dataset):
    """Some items of a decoded-on-demand data set (e.g. torchvision's ``ImageFolder``), with their labels.

    ``labels`` is known without decoding any image, which is all that splitting needs.
    """

    def __init__(self, source: Dataset, indices, labels, *, mean: tuple, std: tuple):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, _ = self.source[int(self.indices[i])]
        return x, self.labels[i]

    def subset(self, idx) -> "LazyImages":
        idx = np.asarray(idx, dtype=np.int64)
        return LazyImages(self.source, self.indices[idx], self.labels[torch.as_tensor(idx)], mean=self.mean, std=self.std)


@dataclass
class DataSplits:
    name: str
    train: Dataset
    proxy: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    native_resolution: int
    mean: tuple  # per channel, of the training split, in the [0, 1] scale of the items
    std: tuple


# ---------------------------------------------------------------------------------------------
# splitting


def stratified_split(labels: np.ndarray, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n_first`` items drawn per class in proportion, and of the rest (both sorted).

    Falls back to a plain seeded draw when ``n_first`` (or the rest) is smaller than the number of
    classes, where a stratified draw is impossible.
    """
    idx = np.arange(len(labels))
    if n_first >= len(labels):
        return idx, idx[:0]
    if n_first <= 0:
        return idx[:0], idx
    try:
        first, rest = train_test_split(idx, train_size=n_first, stratify=labels, random_state=seed)
    except ValueError:
        log.warning("%d of %d items cannot be drawn stratified over %d classes; drawing uniformly",
                    n_first, len(labels), len(np.unique(labels)))
        first, rest = train_test_split(idx, train_size=n_first, random_state=seed)
    return np.sort(first), np.sort(rest)


# ---------------------------------------------------------------------------------------------
# readers: each returns (train_images, train_labels, test_images, test_labels, value_scale), images
# as uint8 arrays (N, C, H, W)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # integers 0..16
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=DIGITS_TEST_SEED)
    return images[tr], d.target[tr], images[te], d.target[te], 16.0


def read_idx(path: Path) -> np.ndarray:
    """An array from an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise EtaError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):
        raise EtaError(f"{path} is truncated: header says {dims}, {len(raw) - offset} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()  # writable, for torch


def _fashion_mnist(root: str | None, download: bool):
    base = Path(root) if root else FASHION_MNIST_ROOT
    # Debian's package puts the four files in one folder; torchvision keeps them in FashionMNIST/raw
    folders = (base, base / "FashionMNIST" / "raw")
    found = next((d for d in folders if all((d / n).is_file() for n in FASHION_MNIST_FILES)), None)
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(base), train=True, download=True)
            FashionMNIST(str(base), train=False, download=True)
        except (OSError, RuntimeError) as err:
            raise EtaError(f"cannot download Fashion-MNIST into {base}: {str(err).splitlines()[0]}") from None
        found = next((d for d in folders if all((d / n).is_file() for n in FASHION_MNIST_FILES)), None)
    if found is None:
        raise EtaError(f"Fashion-MNIST not found in {base} (expected {FASHION_MNIST_FILES[0]} and the other idx files): "
                       "apt-get install dataset-fashion-mnist, set data.root, or set data.download: true")
    xtr, ytr, xte, yte = (read_idx(found / n) for n in FASHION_MNIST_FILES)
    return xtr[:, None], ytr, xte[:, None], yte, 255.0


def _cifar10(root: str | None, download: bool):
    from torchvision.datasets import CIFAR10

    if not root:
        raise EtaError("cifar10 needs data.root (where CIFAR-10 is, or where to download it with data.download: true)")
    try:
        tr, te = CIFAR10(root, train=True, download=download), CIFAR10(root, train=False, download=download)
    except (OSError, RuntimeError) as err:
        hint = "" if download else "; set data.download: true to fetch it"
        raise EtaError(f"CIFAR-10 not found in {root} ({str(err).splitlines()[0]}){hint}") from None
    return (tr.data.transpose(0, 3, 1, 2), np.asarray(tr.targets), te.data.transpose(0, 3, 1, 2),
            np.asarray(te.targets), 255.0)


def _image_folder(root: str | None):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not root or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise EtaError(f"image_folder needs data.root with train/ and val/ folders of class folders; got {root}")
    decode = transforms.Compose([transforms.Resize(IMAGE_FOLDER_SIZE), transforms.CenterCrop(IMAGE_FOLDER_SIZE),
                                 transforms.ToTensor()])
    try:
        train, test = (ImageFolder(str(Path(root) / s), transform=decode) for s in ("train", "val"))
    except (FileNotFoundError, OSError) as err:
        raise EtaError(f"image_folder {root}: {str(err).splitlines()[0]}") from None
    if train.classes != test.classes:
        raise EtaError(f"image_folder {root}: train/ and val/ have different class folders")
    # decoding every image to measure statistics would read the whole set: use ImageNet's, as timm does
    stats = dict(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))
    return (LazyImages(train, np.arange(len(train)), train.targets, **stats),
            LazyImages(test, np.arange(len(test)), test.targets, **stats), len(train.classes))


def _channel_stats(images: torch.Tensor, value_scale: float, chunk: int = 4096) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] units, accumulated in chunks (no float copy of the whole set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start: start + chunk].to(torch.float64) / value_scale
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(s if s > 0 else 1.0 for s in std.tolist())


# ---------------------------------------------------------------------------------------------


def load_splits(name: str, *, root: str | None = None, proxy_fraction: float = 0.05, seed: int = 0,
                download: bool = False, max_train: int | None = None, max_test: int | None = None) -> DataSplits:
    """Train / proxy / test splits of a named data set; nothing is downloaded unless ``download``."""
    if name not in DATASETS:
        raise EtaError(f"unknown data set '{name}' (known: {', '.join(DATASETS)})")
    if not 0 < proxy_fraction < 1:
        raise EtaError(f"data.proxy_fraction must be in (0, 1); got {proxy_fraction}")
    if name == "image_folder":
        full_train, test, num_classes = _image_folder(root)
    else:
        if name == "digits":
            xtr, ytr, xte, yte, scale = _digits()
        elif name == "fashion_mnist":
            xtr, ytr, xte, yte, scale = _fashion_mnist(root, download)
        else:
            xtr, ytr, xte, yte, scale = _cifar10(root, download)
        full_train = InMemoryImages(torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr.astype(np.int64)),
                                    value_scale=scale)
        test = InMemoryImages(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte.astype(np.int64)),
                              value_scale=scale)
        num_classes = int(max(ytr.max(), yte.max()) + 1)

    train_labels = full_train.labels.numpy()
    if max_train is not None:
        full_train = full_train.subset(stratified_split(train_labels, max_train, seed)[0])
        train_labels = full_train.labels.numpy()
    if max_test is not None:
        test = test.subset(stratified_split(test.labels.numpy(), max_test, seed)[0])
    n_proxy = max(1, round(proxy_fraction * len(train_labels)))
    proxy_idx, train_idx = stratified_split(train_labels, n_proxy, seed)
    train, proxy = full_train.subset(train_idx), full_train.subset(proxy_idx)

    if isinstance(train, InMemoryImages):
        mean, std = _channel_stats(train.images, train.value_scale)
        for ds in (train, proxy, test):
            ds.mean, ds.std = mean, std
    x0, _ = train[0]
    log.info("%s: %d train, %d proxy, %d test images of shape %s, %d classes", name, len(train), len(proxy), len(test),
             tuple(x0.shape), num_classes)
    return DataSplits(name=name, train=train, proxy=proxy, test=test, num_classes=num_classes, in_chans=int(x0.shape[0]),
                      native_resolution=int(x0.shape[-1]), mean=train.mean, std=train.std)


# ---------------------------------------------------------------------------------------------
# batching


def num_batches(dataset, batch_size: int, drop_last: bool = False) -> int:
    n = len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Bilinear resize to a square ``resolution``, antialiased when shrinking (no-op when it matches)."""
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    shrinking = resolution < max(x.shape[-2:])
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrinking)


def normalize(x: torch.Tensor, dataset) -> torch.Tensor:
    """``(x - mean) / std`` per channel with the statistics ``dataset`` carries (unchanged if it has none)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return x
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)) / torch.tensor(
        std, dtype=x.dtype, device=x.device).view(shape)


def batches(dataset, batch_size: int, *, resolution: int | None = None, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (normalised float images resized to ``resolution``, labels) on ``device``.

    Shuffling is seeded (same ``seed``, same order); in-memory data is indexed a batch at a time,
    moved to ``device`` as integers and converted there.
    """
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start: start + batch_size]
        if isinstance(dataset, InMemoryImages):
            x = dataset.images[idx].to(device).float() / dataset.value_scale
            y = dataset.labels[idx]
        else:
            x, y = default_collate([dataset[int(i)] for i in idx])
            x = x.to(device).float()
        yield normalize(resize(x, resolution), dataset), torch.as_tensor(y).to(device)
