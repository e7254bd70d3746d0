"""Data sets and their three splits: train (pretraining, teacher training, finetuning), proxy (the solve phase's
quick accuracy of stitched students) and test (the reported front).

Images are stored at one size per data set (the native size of the torchvision sets; image folders
are decoded once at the largest size the search uses) and resized per batch, so one split serves
every resolution of elastic-resolution training without re-reading anything. Items are raw images
in [0, 1]; normalisation happens in :func:`batches` with the statistics of the training split,
which every split carries as ``mean``/``std``. Sets that fit in memory are ``uint8`` tensors (4x
smaller than float) batched by tensor indexing; larger image folders are read item by item through
DataLoader workers (:mod:`eta.loaders`). Training batches may be augmented (:mod:`eta.augment`),
always from the batch's seed. The proxy split is a stratified fraction of the training split and is
removed from it, so the solve phase never scores students on images pretraining trained them on.
"""
from __future__ import annotations

import gzip
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from . import image_folder, loaders
from .augment import Augment
from .errors import EtaError

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "image_folder")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGE_FOLDER_SIZE = 224  # image folders are decoded at this square size unless the caller names one
DEVICE_COPY_MAX_BYTES = 2**30  # in-memory sets up to this size are copied to a GPU once and batched there
DIGITS_TEST_SEED = 0  # the digits test split is the same for every run seed, so fronts compare


class InMemoryImages(Dataset):
    """Images (N, C, H, W) stored as integers in ``[0, value_scale]``, labels, normalisation statistics.

    Items are float images in [0, 1]; :func:`batches` indexes whole batches at once instead. With
    ``rows`` the items are those rows of ``images`` (a memory-mapped cache is subset without copying).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, value_scale: float,
                 mean: tuple = (0.0,), std: tuple = (1.0,), rows=None):
        self.rows = None if rows is None else torch.as_tensor(np.asarray(rows), dtype=torch.long)
        n = len(images) if self.rows is None else len(self.rows)
        if n != len(labels):
            raise ValueError(f"{n} images but {len(labels)} labels")
        self.images, self.labels, self.value_scale = images, labels.long(), float(value_scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, idx, images: torch.Tensor | None = None) -> torch.Tensor:
        """The stored integers of items ``idx`` (from ``images``, a device copy of the store, if given)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.rows is not None:
            idx = self.rows[idx]
        store = self.images if images is None else images
        return store[idx.to(store.device)]

    def raw(self, i: int) -> torch.Tensor:
        return self.gather([int(i)])[0]

    def pil(self, i: int):
        """Item ``i`` as a PIL image (0..255), for per-image transforms."""
        from PIL import Image

        x = self.raw(i).float() * (255.0 / self.value_scale)
        a = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)

    def __getitem__(self, i):
        return self.raw(i).float() / self.value_scale, self.labels[i]

    def subset(self, idx) -> "InMemoryImages":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        if self.rows is not None:
            return InMemoryImages(self.images, self.labels[idx], value_scale=self.value_scale, mean=self.mean, std=self.std,
                                  rows=self.rows[idx])
        return InMemoryImages(self.images[idx], self.labels[idx], value_scale=self.value_scale, mean=self.mean, std=self.std)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # no loaders or device copies


class LazyImages(Dataset):
    """Some items of a decoded-on-demand data set (e.g. an image folder), with their labels.

    ``labels`` is known without decoding any image, which is all that splitting needs. ``workers``
    is how many DataLoader processes :func:`batches` reads it with.
    """

    def __init__(self, source: Dataset, indices, labels, *, mean: tuple, std: tuple, workers: int | None = None):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean, self.std = tuple(mean), tuple(std)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> torch.Tensor:
        j = int(self.indices[i])
        if hasattr(self.source, "raw"):
            return self.source.raw(j)
        return torch.as_tensor(self.source[j][0])

    @property
    def has_pil(self) -> bool:
        return hasattr(self.source, "pil")

    def pil(self, i: int):
        return self.source.pil(int(self.indices[i]))

    def __getitem__(self, i):
        return _unit_scale(self.raw(i)), self.labels[i]

    def subset(self, idx) -> "LazyImages":
        idx = np.asarray(idx, dtype=np.int64)
        return LazyImages(self.source, self.indices[idx], self.labels[torch.as_tensor(idx)], mean=self.mean, std=self.std,
                          workers=self.workers)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """Stored images in [0, 1]: uint8 ones are divided by 255, float ones are already there."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


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


def decode_size_for(resolution: int, resolutions: Sequence[int] = (), decode_size: int | None = None) -> int:
    """The size image folders are decoded at: ``data.decode_size``, else the largest resolution the space uses."""
    if decode_size:
        return int(decode_size)
    return int(max([int(resolution), *[int(r) for r in resolutions]]))


def _image_folder(root: str | None, *, decode_size: int, cache: str, workers: int, cache_max_gb: float):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .paths import cache_subdir

    indexes = image_folder.scan_splits(root)
    # decoding every image to measure statistics would read the whole set: use ImageNet's, as timm does
    stats = dict(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))
    n_bytes = sum(len(ix.samples) for ix in indexes) * 3 * decode_size ** 2
    mode = image_folder.choose_cache(cache, n_bytes, cache_max_gb)
    log.info("image_folder %s: %d images at %d px (%.2f GB as uint8): %s", root, sum(len(ix.samples) for ix in indexes),
             decode_size, n_bytes / 1e9, {"none": "read lazily"}.get(mode, f"cached ({mode})"))
    splits = []
    for index in indexes:
        labels = torch.as_tensor(index.labels)
        if mode == "none":
            splits.append(LazyImages(image_folder.FolderImages(index, decode_size), np.arange(len(labels)), labels,
                                     workers=workers, **stats))
            continue
        try:
            where = cache_subdir("data") / "image_folder"
            where.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("no writable data cache (%s): decoding %s without one", err, index.root)
            where = None
        array = image_folder.decoded_array(index, decode_size, mode=mode, workers=workers, cache_dir=where)
        images = image_folder.as_tensor(array)
        rows = np.arange(len(labels)) if mode == "disk" else None
        splits.append(InMemoryImages(images, labels, value_scale=255.0, rows=rows, **stats))
    return splits[0], splits[1], len(indexes[0].classes)


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
                download: bool = False, max_train: int | None = None, max_test: int | None = None,
                decode_size: int | None = None, cache: str = "auto", workers: int | None = None,
                cache_max_gb: float = image_folder.DEFAULT_CACHE_MAX_GB) -> DataSplits:
    """Train / proxy / test splits of a named data set; nothing is downloaded unless ``download``.

    Image folders are decoded at ``decode_size`` (default ``IMAGE_FOLDER_SIZE``; :func:`decode_size_for`
    gives a space's) and kept as uint8 arrays per ``cache`` (``auto``: in memory when they fit
    ``cache_max_gb``); ``workers`` DataLoader processes read what stays lazy.
    """
    if name not in DATASETS:
        raise EtaError(f"data.dataset: unknown data set '{name}' (known: {', '.join(DATASETS)})")
    if not 0 < proxy_fraction < 1:
        raise EtaError(f"data.proxy_fraction must be in (0, 1); got {proxy_fraction}")
    workers = loaders.default_workers() if workers is None else int(workers)
    own_stats = name != "image_folder"
    if name == "image_folder":
        full_train, test, num_classes = _image_folder(root, decode_size=int(decode_size or IMAGE_FOLDER_SIZE), cache=cache,
                                                      workers=workers, cache_max_gb=cache_max_gb)
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

    if own_stats and isinstance(train, InMemoryImages):
        mean, std = _channel_stats(train.images, train.value_scale)
        for ds in (train, proxy, test):
            ds.mean, ds.std = mean, std
    shape = tuple(train.images.shape[1:]) if isinstance(train, InMemoryImages) else (3, train.source.size, train.source.size)
    log.info("%s: %d train, %d proxy, %d test images of shape %s, %d classes", name, len(train), len(proxy), len(test),
             shape, num_classes)
    return DataSplits(name=name, train=train, proxy=proxy, test=test, num_classes=num_classes, in_chans=int(shape[0]),
                      native_resolution=int(shape[-1]), mean=train.mean, std=train.std)


def split_options(space) -> dict:
    """:func:`load_splits` keywords for a search space (decode size from every resolution it uses)."""
    d = space.data
    return dict(root=d.root, proxy_fraction=d.proxy_fraction, seed=space.seed, download=d.download, max_train=d.max_train,
                max_test=d.max_test, decode_size=decode_size_for(d.resolution, space.resolutions, d.decode_size),
                cache=d.cache, workers=d.workers, cache_max_gb=d.cache_max_gb)


# ---------------------------------------------------------------------------------------------
# batching


def num_batches(dataset, batch_size: int, drop_last: bool = False, world: int = 1) -> int:
    """Batches in one pass, or in one data-parallel worker's share of it (``world`` workers)."""
    n = len(dataset)
    total = n // batch_size if drop_last else -(-n // batch_size)
    return total // world


def shard_batches(total: int, rank: int, world: int) -> range:
    """Indices of the batches data-parallel worker ``rank`` of ``world`` takes from a pass of ``total``.

    Workers take turns (rank r: batches r, r + world, ...), so one step of ``world`` workers sees the
    batches one process would see in ``world`` consecutive steps; the last ``total % world`` batches
    are dropped so that every worker takes as many steps (gradient all-reduce needs every rank).
    """
    if not 0 <= rank < world:
        raise EtaError(f"data-parallel rank {rank} is not one of {world} workers")
    return range(rank, total - total % world, world)


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


def _batch_seed(seed: int, k: int) -> int:
    return (int(seed) * 1_000_003 + int(k) * 7_919 + 17) % 2**62


def _item_seed(seed: int, position: int) -> int:
    return (int(seed) * 998_244_353 + int(position) * 104_729 + 91) % 2**62


def _on_device(dataset: InMemoryImages, device) -> torch.Tensor | None:
    """A copy of a small in-memory store on a GPU, made once, so batches are gathered there."""
    device = torch.device(device)
    if device.type == "cpu" or dataset.rows is not None or dataset.images.numel() > DEVICE_COPY_MAX_BYTES:
        return None
    copies = dataset.__dict__.setdefault("_device_copies", {})
    if device not in copies:
        copies[device] = dataset.images.to(device)
    return copies[device]


def _per_image_source(dataset) -> bool:
    return isinstance(dataset, InMemoryImages) or getattr(dataset, "has_pil", False)


def batches(dataset, batch_size: int, *, resolution: int | None = None, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False, device="cpu", augment: Augment | None = None,
            workers: int | None = None, shard: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (normalised float images resized to ``resolution``, labels) on ``device``.

    Shuffling and ``augment`` are seeded (same ``seed``, same batches); in-memory data is indexed a
    batch at a time, moved to ``device`` as integers and converted there. Lazily read sets (and
    per-image augmentation such as RandAugment) go through DataLoader workers (``workers``, default
    the set's own). With mixup/cutmix the labels are soft targets (N, classes).
    ``shard=(rank, world)``: this data-parallel worker's share, every ``world``-th batch of the one
    seeded pass, as many for every rank (see :func:`shard_batches`).
    """
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    starts = {k: start for k, start in enumerate(range(0, stop, batch_size))}
    if shard is not None:
        starts = {k: starts[k] for k in shard_batches(len(starts), *shard)}
    aug = augment if augment is not None and augment.active else None
    per_image = aug is not None and aug.per_image and _per_image_source(dataset)
    batch_aug = None if aug is None else (aug.after_images() if per_image else aug)
    device = torch.device(device)

    def finish(k, x, y):
        x = resize(x, resolution)
        if batch_aug is not None:
            x = batch_aug.geometric(x, _batch_seed(seed, k))
        x = normalize(x, dataset)
        y = torch.as_tensor(y).to(device)
        if aug is not None and aug.mixes:
            x, y = aug.mix(x, y, _batch_seed(seed, k) + 1)
        return x, y

    if isinstance(dataset, InMemoryImages) and not per_image:
        store = _on_device(dataset, device)
        for k, start in starts.items():
            idx = order[start: start + batch_size]
            x = dataset.gather(idx, store).to(device, non_blocking=True).float() / dataset.value_scale
            yield finish(k, x, dataset.labels[idx])
        return

    if workers is None:
        workers = getattr(dataset, "workers", None)
    workers = loaders.default_workers() if workers is None else int(workers)
    size = resolution or _stored_size(dataset)
    reader = _detached(dataset)  # what workers hold: never the loaders kept on the data set itself
    if per_image:
        key = ("augment", aug, size)
        transform = aug.image_transform(size, dataset.mean)
        make = lambda: loaders.SeededItems(reader.raw, reader.labels, open_pil=reader.pil, transform=transform)  # noqa: E731
    else:
        key = ("raw",)
        make = lambda: loaders.SeededItems(reader.raw, reader.labels)  # noqa: E731
    loader = loaders.loader_for(dataset, key, make, workers=workers, pin_memory=device.type == "cuda")
    plan = [[(int(i), _item_seed(seed, start + j)) for j, i in enumerate(order[start: start + batch_size].tolist())]
            for start in starts.values()]
    for k, (x, y) in zip(starts, loader.run(plan)):
        yield finish(k, _unit_scale(x.to(device, non_blocking=True)), y)


def _detached(dataset):
    """A shallow copy of a data set without its loaders and device copies (workers that hold a loader
    they did not start wait for it at exit)."""
    clone = object.__new__(type(dataset))
    clone.__dict__.update(dataset.__getstate__())
    return clone


def _stored_size(dataset) -> int:
    if isinstance(dataset, InMemoryImages):
        return int(dataset.images.shape[-1])
    return int(getattr(dataset.source, "size", 0)) or int(dataset.raw(0).shape[-1])
