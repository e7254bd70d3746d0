"""Image folders (``train/`` and ``val/`` of class folders), decoded once at the size the search needs.

Decoding a JPEG or PNG costs far more than training on it at CIFAR sizes, and a folder decoded at
224 px only to be shrunk to 32 px every epoch wastes both. So every image is decoded at one square
size (shorter side resized to it, centre crop), and when the decoded set is small enough it is kept
as one uint8 array (N, 3, S, S): in memory, or memory-mapped from the cache, written once and
found again by the folder's path, its files' sizes and times and the decode size. Larger sets stay
lazy and are decoded per item by DataLoader workers (:mod:`eta.loaders`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import EtaError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the decoded arrays change meaning
CACHE_MODES = ("auto", "memory", "disk", "none")
DEFAULT_CACHE_MAX_GB = 4.0  # auto: decoded sets up to this size (and half the free memory) are kept in memory


@dataclass
class FolderIndex:
    """The files of one split folder and their class labels, found without decoding anything."""

    root: Path
    classes: list
    samples: list  # (path, label)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.samples], dtype=np.int64)


def scan(folder: Path) -> FolderIndex:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as err:
        raise EtaError(f"image_folder {folder}: {str(err).splitlines()[0]}") from None
    return FolderIndex(Path(folder), classes, samples)


def scan_splits(root: str | None) -> tuple[FolderIndex, FolderIndex]:
    """``train/`` and ``val/`` of ``root``, which must hold the same class folders."""
    if not root or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise EtaError(f"image_folder needs data.root with train/ and val/ folders of class folders; got {root}")
    train, val = scan(Path(root) / "train"), scan(Path(root) / "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = [f"only in train/: {', '.join(only_train[:5])}" if only_train else "",
                 f"only in val/: {', '.join(only_val[:5])}" if only_val else ""]
        raise EtaError(f"image_folder {root}: train/ and val/ have different class folders ({'; '.join(p for p in parts if p)})")
    return train, val


# ---------------------------------------------------------------------------------------------
# decoding


def open_image(path: str):
    """The image at ``path`` as an RGB PIL image, fully read (so a truncated file fails here)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise EtaError(f"image_folder: cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def decode_image(path: str, size: int) -> np.ndarray:
    """(3, size, size) uint8: shorter side resized to ``size`` (bilinear, antialiased), centre crop."""
    from PIL import Image

    im = open_image(path)
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


class Unreadable:
    """What a worker returns instead of an image it could not read, so the reason reaches the user in one line."""

    def __init__(self, message: str):
        self.message = message


class FolderImages(Dataset):
    """The images of a folder index, decoded at ``size`` on demand: items are (uint8 (3, S, S), label)."""

    def __init__(self, index: FolderIndex, size: int):
        self.index, self.size = index, int(size)

    def __len__(self) -> int:
        return len(self.index.samples)

    def raw(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.index.samples[i][0], self.size))

    def pil(self, i: int):
        return open_image(self.index.samples[i][0])

    def __getitem__(self, i):
        return self.raw(i), self.index.samples[i][1]


class _Decoding(Dataset):
    def __init__(self, images: FolderImages):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            return self.images.raw(i)
        except EtaError as err:
            return Unreadable(str(err))


def _stack(items):
    bad = next((x for x in items if isinstance(x, Unreadable)), None)
    return bad if bad is not None else torch.stack(items)


# ---------------------------------------------------------------------------------------------
# the cache


def cache_key(index: FolderIndex, size: int) -> str:
    """Names the decoded array: the folder, every file with its size and modification time, the decode size."""
    files = []
    for path, label in index.samples:
        st = os.stat(path)
        files.append((os.path.relpath(path, index.root), st.st_size, st.st_mtime_ns, label))
    text = json.dumps([CACHE_FORMAT, str(index.root.resolve()), int(size), files])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def choose_cache(mode: str, n_bytes: int, max_gb: float) -> str:
    """memory, disk or none for a decoded set of ``n_bytes`` (``auto``: memory when it fits the budget)."""
    if mode not in CACHE_MODES:
        raise EtaError(f"data.cache must be one of {', '.join(CACHE_MODES)}; got {mode}")
    if mode != "auto":
        return mode
    import psutil

    fits = n_bytes <= max_gb * 2**30 and n_bytes <= 0.5 * psutil.virtual_memory().available
    return "memory" if fits else "none"


def _decode_all(images: FolderImages, out: np.ndarray, workers: int) -> None:
    loader = DataLoader(_Decoding(images), batch_size=64, num_workers=workers, collate_fn=_stack,
                        prefetch_factor=4 if workers else None)
    start = 0
    for batch in loader:
        if isinstance(batch, Unreadable):
            raise EtaError(batch.message)
        out[start: start + len(batch)] = batch.numpy()
        start += len(batch)


def decoded_array(index: FolderIndex, size: int, *, mode: str, workers: int, cache_dir: Path | None) -> np.ndarray:
    """The folder decoded as one uint8 array (N, 3, S, S), read from ``cache_dir`` when decoded before.

    ``mode`` is ``memory`` (the array in RAM) or ``disk`` (memory-mapped from the cache file).
    """
    images = FolderImages(index, size)
    shape = (len(images), 3, int(size), int(size))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{index.root.name}-{int(size)}px-{cache_key(index, size)}.npy"
        if path.is_file():
            log.info("image_folder %s: decoded images found in %s", index.root, path)
            return _open(path, mode)
    t0 = time.time()
    log.info("image_folder %s: decoding %d images at %d px (%d workers)", index.root, len(images), size, workers)
    if path is None:
        if mode == "disk":
            raise EtaError("data.cache: disk needs a writable cache directory")
        out = np.empty(shape, dtype=np.uint8)
        _decode_all(images, out, workers)
        return out
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _decode_all(images, out, workers)
        out.flush()
        del out
        os.replace(tmp, path)  # atomic: a killed decode leaves no half-written cache behind
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if mode == "disk":
            raise EtaError(f"data.cache: cannot write {path} ({err})") from None
        log.warning("image_folder: cannot write the decoded images to %s (%s); keeping them in memory only", path, err)
        out = np.empty(shape, dtype=np.uint8)
        _decode_all(images, out, workers)
        return out
    finally:
        tmp.unlink(missing_ok=True)
    log.info("image_folder %s: decoded in %.1f s into %s", index.root, time.time() - t0, path)
    return _open(path, mode)


def _open(path: Path, mode: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mode == "disk" else None)
    except (OSError, ValueError) as err:
        raise EtaError(f"data cache {path} is unreadable ({str(err).splitlines()[0]}); delete it to decode again") from None


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over the array (a memory map stays a memory map: nothing is copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory maps: eta never writes into them
        return torch.from_numpy(array)
