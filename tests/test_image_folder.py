"""Image folders: decoded at the size the search needs, cached as uint8, read lazily by DataLoader workers
with the same images, augmented reproducibly, and bad folders or files named in one line."""
import os

import numpy as np
import pytest
import torch

import eta.image_folder
from eta.augment import resolve
from eta.data import InMemoryImages, LazyImages, batches, decode_size_for, load_splits
from eta.errors import EtaError

CLASSES = ("ant", "bee", "cow")


def _image(rng, size):
    """A smooth random picture (so resizing it is not resizing noise)."""
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    from PIL import Image

    return Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BILINEAR)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """3 classes x 12 training images (20x20 and 24x24 PNGs) and 4 validation images each; a private cache."""
    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, n in (("train", 12), ("val", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(rng, 24 if i % 3 == 0 else 20).save(root / split / c / f"{i:02d}.png")
    return root


def _counting(monkeypatch):
    calls = []
    decode = eta.image_folder.decode_image

    def counted(path, size):
        calls.append(path)
        return decode(path, size)

    monkeypatch.setattr(eta.image_folder, "decode_image", counted)
    return calls


def test_decoded_once_at_its_own_size_and_cached(folder, monkeypatch):
    calls = _counting(monkeypatch)
    s = load_splits("image_folder", root=str(folder), decode_size=24, workers=0, proxy_fraction=0.25)
    assert isinstance(s.train, InMemoryImages) and s.train.images.dtype == torch.uint8
    assert (s.num_classes, s.in_chans, s.native_resolution) == (3, 3, 24) and tuple(s.train.images.shape[1:]) == (3, 24, 24)
    assert len(s.train) + len(s.proxy) == 36 and len(s.test) == 12 and len(calls) == 48
    # a 24x24 file is stored pixel for pixel; a 20x20 one is upscaled once, at decode
    from PIL import Image

    path = folder / "train" / "ant" / "00.png"
    i = [p for p, _ in eta.image_folder.scan(folder / "train").samples].index(str(path))
    whole = load_splits("image_folder", root=str(folder), decode_size=24, workers=0, proxy_fraction=0.25)
    assert len(calls) == 48  # the second load read the cache: not one file decoded again
    full = np.load(next((folder.parent / "cache" / "data" / "image_folder").glob("train-24px-*.npy")))
    assert np.array_equal(full[i], np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))
    for a, b in ((s.train, whole.train), (s.proxy, whole.proxy), (s.test, whole.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # another decode size, or a file changed since, is another cache entry
    load_splits("image_folder", root=str(folder), decode_size=16, workers=0)
    assert len(calls) == 96
    os.utime(path, ns=(1, 1))
    load_splits("image_folder", root=str(folder), decode_size=24, workers=0)
    assert len(calls) == 96 + 36


def test_decode_size_is_the_largest_resolution_used():
    assert decode_size_for(32, [24, 28, 32]) == 32 and decode_size_for(24, [24, 40]) == 40
    assert decode_size_for(32, [24], decode_size=64) == 64


def _all(ds, **kw):
    return [(x, y) for x, y in batches(ds, 5, resolution=16, **kw)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_lazy_workers_and_disk_give_the_cached_images(folder):
    cached = load_splits("image_folder", root=str(folder), decode_size=24, workers=0)
    lazy = load_splits("image_folder", root=str(folder), decode_size=24, cache="none", workers=2)
    disk = load_splits("image_folder", root=str(folder), decode_size=24, cache="disk", workers=0)
    assert isinstance(lazy.train, LazyImages) and lazy.train.workers == 2
    assert isinstance(disk.train, InMemoryImages) and disk.train.rows is not None
    assert isinstance(disk.train.images.numpy().base, np.memmap) or not disk.train.images.numpy().flags.owndata
    for split in ("train", "proxy", "test"):
        ref = _all(getattr(cached, split), shuffle=True, seed=3)
        assert _same(ref, _all(getattr(lazy, split), shuffle=True, seed=3))
        assert _same(ref, _all(getattr(disk, split), shuffle=True, seed=3))
    # the workers persist from one pass to the next, and a pass cut short does not disturb the next
    first = next(batches(lazy.train, 5, resolution=16, shuffle=True, seed=4))
    again = _all(lazy.train, shuffle=True, seed=4)
    assert torch.equal(first[0], again[0][0]) and len(lazy.train._loaders) == 1


def test_augmentation_changes_training_batches_reproducibly(folder):
    s = load_splits("image_folder", root=str(folder), decode_size=24, workers=0)
    lazy = load_splits("image_folder", root=str(folder), decode_size=24, cache="none", workers=2)
    standard = resolve("auto", "image_folder", s.num_classes)
    assert standard.crop == "resized" and standard.hflip == 0.5
    plain = _all(s.train, shuffle=True, seed=1)
    augmented = _all(s.train, shuffle=True, seed=1, augment=standard)
    assert _same(augmented, _all(s.train, shuffle=True, seed=1, augment=standard))  # same seed, same batches
    assert not _same(augmented, plain) and not _same(augmented, _all(s.train, shuffle=True, seed=2, augment=standard))
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(augmented, plain))  # labels untouched
    # the lazy set gets the very same augmented batches
    assert _same(augmented, _all(lazy.train, shuffle=True, seed=1, augment=standard))
    # per-image RandAugment in the workers, then mixup: independent of the number of workers, seeded
    strong = resolve({"preset": "strong"}, "image_folder", s.num_classes)
    with_workers = _all(lazy.train, shuffle=True, seed=1, augment=strong)
    assert _same(with_workers, _all(lazy.train, shuffle=True, seed=1, augment=strong, workers=0))
    in_memory = _all(s.train, shuffle=True, seed=1, augment=strong, workers=2)  # from the decoded images, not the files
    assert _same(in_memory, _all(s.train, shuffle=True, seed=1, augment=strong, workers=0))
    assert not _same(in_memory, _all(s.train, shuffle=True, seed=2, augment=strong, workers=0))
    x, y = with_workers[0]
    assert x.shape == (5, 3, 16, 16) and y.shape == (5, 3) and torch.allclose(y.sum(1), torch.ones(5))
    # evaluation batches are never augmented
    from eta.train import evaluate

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    model.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    evaluate(model, s.test, resolution=16, batch_size=5)
    assert _same([(x, y) for x, (_, y) in zip(seen, _all(s.test))], _all(s.test))


def test_mismatched_classes_and_corrupt_files_are_named(folder):
    (folder / "val" / "dog").mkdir()
    (folder / "val" / "ant" / "00.png").rename(folder / "val" / "dog" / "00.png")
    with pytest.raises(EtaError, match=r"train/ and val/ have different class folders \(only in val/: dog\)"):
        load_splits("image_folder", root=str(folder), decode_size=24)
    (folder / "val" / "dog" / "00.png").rename(folder / "val" / "ant" / "00.png")
    (folder / "val" / "dog").rmdir()
    bad = folder / "train" / "bee" / "05.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    for kw in ({"workers": 0}, {"workers": 2}, {"cache": "none", "workers": 2}):
        with pytest.raises(EtaError) as e:
            s = load_splits("image_folder", root=str(folder), decode_size=24, **kw)
            for split in (s.train, s.proxy):
                list(batches(split, 8))
        assert str(bad) in str(e.value) and "\n" not in str(e.value), kw
