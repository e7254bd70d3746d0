"""Data splits: sizes, disjointness, stratification, resizing, normalisation, clear errors for missing data."""
import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from eta.data import (FASHION_MNIST_FILES, FASHION_MNIST_ROOT, InMemoryImages, LazyImages, batches, load_splits,
                      num_batches, read_idx, resize)
from eta.errors import EtaError


def _rows(ds) -> list[bytes]:
    return [ds.images[i].numpy().tobytes() for i in range(len(ds))]


def _reference_digits():
    """The digits train/test split the loader promises: stratified 20% test, seed 0, raw 0..16 values."""
    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    rows = [img.astype(np.uint8)[None].tobytes() for img in d.images]
    return [rows[i] for i in tr], d.target[tr], [rows[i] for i in te]


def test_digits_splits_partition_the_reference_split():
    s = load_splits("digits", proxy_fraction=0.1, seed=3)
    ref_train, ref_labels, ref_test = _reference_digits()
    assert (s.num_classes, s.in_chans, s.native_resolution) == (10, 1, 8)
    assert len(s.test) == 360 and len(s.train) + len(s.proxy) == 1437
    assert len(s.proxy) == round(0.1 * 1437)
    # train and proxy together are exactly the reference training images, test is the reference test set
    assert sorted(_rows(s.train) + _rows(s.proxy)) == sorted(ref_train)
    assert sorted(_rows(s.test)) == sorted(ref_test)
    assert not set(_rows(s.train)) & set(_rows(s.proxy))
    assert not (set(_rows(s.train)) | set(_rows(s.proxy))) & set(_rows(s.test))
    # stratified: each class's share of the proxy set matches its share of the training data
    expected = np.bincount(ref_labels, minlength=10) * 0.1
    assert np.abs(np.bincount(s.proxy.labels.numpy(), minlength=10) - expected).max() <= 1


def test_proxy_depends_on_seed_and_test_does_not():
    a, b = load_splits("digits", seed=0), load_splits("digits", seed=1)
    assert sorted(_rows(a.proxy)) != sorted(_rows(b.proxy))
    assert sorted(_rows(a.test)) == sorted(_rows(b.test))
    assert sorted(_rows(load_splits("digits", seed=0).proxy)) == sorted(_rows(a.proxy))


def test_max_train_and_max_test_subsample_stratified():
    s = load_splits("digits", max_train=300, max_test=100, proxy_fraction=0.1)
    assert len(s.train) + len(s.proxy) == 300 and len(s.test) == 100 and len(s.proxy) == 30
    for ds, n in ((s.test, 100), (s.proxy, 30)):
        counts = np.bincount(ds.labels.numpy(), minlength=10)
        assert counts.max() - counts.min() <= 2 and counts.sum() == n


def test_normalised_with_training_statistics():
    s = load_splits("digits")
    x, _ = next(batches(s.train, len(s.train)))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert len(s.mean) == len(s.std) == s.in_chans == 1
    # every split is normalised with the training split's statistics, not its own
    xt, _ = next(batches(s.test, len(s.test)))
    raw = torch.stack([s.test[i][0] for i in range(len(s.test))])
    assert torch.allclose(xt, (raw - s.mean[0]) / s.std[0], atol=1e-5)


def test_batches_resize_shuffle_and_count():
    s = load_splits("digits")
    xs = list(batches(s.train, 64, resolution=32, shuffle=True, seed=1, drop_last=True))
    assert len(xs) == num_batches(s.train, 64, drop_last=True) == len(s.train) // 64
    assert num_batches(s.train, 64) == -(-len(s.train) // 64)
    assert xs[0][0].shape == (64, 1, 32, 32) and xs[0][0].dtype == torch.float32 and xs[0][1].dtype == torch.long
    again = next(batches(s.train, 64, resolution=32, shuffle=True, seed=1))
    assert torch.equal(again[0], xs[0][0]) and torch.equal(again[1], xs[0][1])
    assert not torch.equal(next(batches(s.train, 64, resolution=32, shuffle=True, seed=2))[1], xs[0][1])
    last = list(batches(s.test, 100, resolution=12))
    assert [len(y) for _, y in last] == [100, 100, 100, 60] and last[0][0].shape[-2:] == (12, 12)
    # unshuffled batches are the items in order, resized with torch's bilinear interpolation
    x, y = next(batches(s.test, 5, resolution=32))
    raw = torch.stack([s.test[i][0] for i in range(5)])
    ref = (F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False) - s.mean[0]) / s.std[0]
    assert torch.allclose(x, ref, atol=1e-5) and torch.equal(y, s.test.labels[:5])


def test_in_memory_batches_index_whole_batches(monkeypatch):
    s = load_splits("digits")

    def per_item(*_):
        raise AssertionError("batches() read an in-memory data set item by item")

    monkeypatch.setattr(InMemoryImages, "__getitem__", per_item)
    assert sum(len(y) for _, y in batches(s.train, 256, resolution=16, shuffle=True)) == len(s.train)


def test_shrinking_is_antialiased():
    board = (torch.arange(12)[:, None] + torch.arange(12)[None, :]) % 2
    small = resize(board.float()[None, None], 4)
    # plain bilinear sampling at scale 3 hits pixel centres and returns pure 0/1 (aliasing)
    assert small.shape == (1, 1, 4, 4) and float((small - 0.5).abs().max()) < 0.2
    assert torch.equal(resize(board.float()[None, None], 12), board.float()[None, None])  # same size: untouched


def test_missing_fashion_mnist_names_path(tmp_path):
    with pytest.raises(EtaError) as e:
        load_splits("fashion_mnist", root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "download" in msg
    assert "\n" not in msg


def _write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_in_torchvision_layout(tmp_path):
    """Files torchvision downloaded (root/FashionMNIST/raw) are read without torchvision."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = [rng.integers(0, 256, (200, 28, 28)), np.repeat(np.arange(10), 20),
              rng.integers(0, 256, (50, 28, 28)), np.repeat(np.arange(10), 5)]
    for name, a in zip(FASHION_MNIST_FILES, arrays):
        _write_idx(raw / name, a)
    assert np.array_equal(read_idx(raw / FASHION_MNIST_FILES[0]), arrays[0])
    s = load_splits("fashion_mnist", root=str(tmp_path), proxy_fraction=0.1)
    assert len(s.train) == 180 and len(s.proxy) == 20 and len(s.test) == 50
    assert sorted(_rows(s.test)) == sorted(a.astype(np.uint8)[None].tobytes() for a in arrays[2])
    assert np.array_equal(np.bincount(s.proxy.labels.numpy()), np.full(10, 2))


def test_truncated_idx_file_is_an_eta_error(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(EtaError, match="truncated"):
        read_idx(path)


def test_unknown_dataset_and_missing_cifar():
    with pytest.raises(EtaError, match="known: digits, fashion_mnist"):
        load_splits("imagenet-21k")
    with pytest.raises(EtaError, match="data.root"):
        load_splits("cifar10")


def test_image_folder_is_lazy_and_stratified(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 3)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    s = load_splits("image_folder", root=str(tmp_path), proxy_fraction=0.2, cache="none", workers=0)
    assert isinstance(s.train, LazyImages) and (s.num_classes, s.in_chans, s.native_resolution) == (2, 3, 224)
    assert len(s.train) == 16 and np.array_equal(np.bincount(s.proxy.labels.numpy()), [2, 2]) and len(s.test) == 6
    assert not set(s.train.indices) & set(s.proxy.indices)
    x, y = next(batches(s.proxy, 8, resolution=32))
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, s.proxy.labels)
    with pytest.raises(EtaError, match="train/ and val/"):
        load_splits("image_folder", root=str(tmp_path / "train"))


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / FASHION_MNIST_FILES[0]).exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    s = load_splits("fashion_mnist")
    assert len(s.train) + len(s.proxy) == 60000 and len(s.test) == 10000 and len(s.proxy) == 3000
    assert (s.num_classes, s.in_chans, s.native_resolution) == (10, 1, 28)
    assert np.array_equal(np.bincount(s.test.labels.numpy()), np.full(10, 1000))
    assert np.array_equal(np.bincount(s.proxy.labels.numpy()), np.full(10, 300))
    assert 0.2 < s.mean[0] < 0.4  # Fashion-MNIST's well-known mean pixel is about 0.286
