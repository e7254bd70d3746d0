"""Data sets and their splits: train (phase 1 and finetuning), proxy (phase 2), test (the front).

Small data sets are held in memory as tensors at their native size and resized per batch, so one
split serves every resolution of elastic-resolution training without re-reading anything. The
proxy split is a stratified fraction of the training split, removed from it.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from .errors import EtaError

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "image_folder")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


class TensorImages(torch.utils.data.Dataset):
    """Images (N, C, H, W, already normalised) and labels in memory, indexable in batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def subset(self, idx) -> "TensorImages":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx])


@dataclass
class DataSplits:
    name: str
    train: torch.utils.data.Dataset
    proxy: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    in_chans: int
    native_resolution: int


def _stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    idx = np.arange(len(labels))
    if n is None or n >= len(labels):
        return idx
    keep, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(keep)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:, None] / 16.0
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    return x[tr], d.target[tr], x[te], d.target[te]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(root: str | None, download: bool):
    base = Path(root) if root else FASHION_MNIST_ROOT
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((base / n).exists() for n in names):
        xtr, ytr, xte, yte = (_read_idx(base / n) for n in names)
    elif download:
        from torchvision.datasets import FashionMNIST

        tr, te = FashionMNIST(str(base), train=True, download=True), FashionMNIST(str(base), train=False, download=True)
        xtr, ytr, xte, yte = tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()
    else:
        raise EtaError(
            f"Fashion-MNIST not found in {base} (expected {names[0]} etc.): apt-get install dataset-fashion-mnist, "
            "set data.root, or set data.download: true"
        )
    return xtr[:, None] / 255.0, ytr.astype(np.int64), xte[:, None] / 255.0, yte.astype(np.int64)


def _torchvision_cifar10(root: str | None, download: bool):
    from torchvision.datasets import CIFAR10

    if not root:
        raise EtaError("data.root is required for cifar10 (where the data lives or should be downloaded)")
    try:
        tr, te = CIFAR10(root, train=True, download=download), CIFAR10(root, train=False, download=download)
    except RuntimeError as err:
        raise EtaError(f"CIFAR-10 not found in {root}: {err}; set data.download: true") from None
    return tr.data.transpose(0, 3, 1, 2) / 255.0, np.array(tr.targets), te.data.transpose(0, 3, 1, 2) / 255.0, np.array(te.targets)


def _image_folder(root: str | None, size: int = 64):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not root or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise EtaError(f"image_folder needs data.root with train/ and val/ class folders; got {root}")
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])

    def load(split):
        ds = ImageFolder(str(Path(root) / split), transform=tf)
        xs, ys = zip(*[(x.numpy(), y) for x, y in ds])
        return np.stack(xs), np.array(ys)

    xtr, ytr = load("train")
    xte, yte = load("val")
    return xtr, ytr, xte, yte


def load_splits(name: str, *, root: str | None = None, proxy_fraction: float = 0.05, seed: int = 0, download: bool = False,
                max_train: int | None = None, max_test: int | None = None) -> DataSplits:
    """Train / proxy / test splits of a named data set, normalised, in memory."""
    if name == "digits":
        xtr, ytr, xte, yte = _digits()
    elif name == "fashion_mnist":
        xtr, ytr, xte, yte = _fashion_mnist(root, download)
    elif name == "cifar10":
        xtr, ytr, xte, yte = _torchvision_cifar10(root, download)
    elif name == "image_folder":
        xtr, ytr, xte, yte = _image_folder(root)
    else:
        raise EtaError(f"unknown data set '{name}' (known: {', '.join(DATASETS)})")
    keep = _stratified_subset(ytr, max_train, seed)
    xtr, ytr = xtr[keep], ytr[keep]
    keep = _stratified_subset(yte, max_test, seed)
    xte, yte = xte[keep], yte[keep]
    mean, std = float(xtr.mean()), float(xtr.std()) or 1.0
    norm = lambda x: torch.from_numpy(((x - mean) / std).astype(np.float32))  # noqa: E731
    full = TensorImages(norm(xtr), torch.from_numpy(ytr.astype(np.int64)))
    train_idx, proxy_idx = train_test_split(np.arange(len(ytr)), test_size=proxy_fraction, stratify=ytr, random_state=seed)
    return DataSplits(
        name=name,
        train=full.subset(np.sort(train_idx)),
        proxy=full.subset(np.sort(proxy_idx)),
        test=TensorImages(norm(xte), torch.from_numpy(yte.astype(np.int64))),
        num_classes=int(max(ytr.max(), yte.max()) + 1),
        in_chans=int(xtr.shape[1]),
        native_resolution=int(xtr.shape[-1]),
    )


def num_batches(dataset, batch_size: int, drop_last: bool = False) -> int:
    n = len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=resolution < x.shape[-1])


def batches(dataset, batch_size: int, *, resolution: int | None = None, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images resized to ``resolution``, labels); seeded shuffling, no per-sample Python loop."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        if isinstance(dataset, TensorImages):
            x, y = dataset.images[idx], dataset.labels[idx]
        else:
            x, y = torch.utils.data.default_collate([dataset[int(j)] for j in idx])
        yield resize(x.to(device), resolution), y.to(device)
