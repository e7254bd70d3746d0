"""Data splits: sizes, disjointness, stratification, resizing, clear errors for missing data."""
import numpy as np
import pytest
import torch

from eta.data import FASHION_MNIST_ROOT, batches, load_splits, num_batches
from eta.errors import EtaError


def _rows(ds):
    return {hash(x.numpy().tobytes()) for x in ds.images}


def test_digits_splits_disjoint_and_stratified():
    s = load_splits("digits", proxy_fraction=0.1, seed=3)
    assert (s.num_classes, s.in_chans, s.native_resolution) == (10, 1, 8)
    assert len(s.train) + len(s.proxy) == 1437 and len(s.test) == 360
    assert abs(len(s.proxy) - 144) <= 1
    assert not (_rows(s.train) & _rows(s.proxy)) and not (_rows(s.proxy) & _rows(s.test))
    counts = np.bincount(s.proxy.labels.numpy(), minlength=10)
    assert counts.min() >= 12 and counts.max() <= 16  # stratified: ~14 per class
    assert abs(float(s.train.images.mean())) < 0.05 and abs(float(s.train.images.std()) - 1) < 0.05


def test_batches_resize_shuffle_and_count():
    s = load_splits("digits")
    xs = list(batches(s.train, 64, resolution=32, shuffle=True, seed=1, drop_last=True))
    assert len(xs) == num_batches(s.train, 64, drop_last=True) == len(s.train) // 64
    assert xs[0][0].shape == (64, 1, 32, 32) and xs[0][1].dtype == torch.long
    again = next(batches(s.train, 64, resolution=32, shuffle=True, seed=1))
    assert torch.equal(again[1], xs[0][1])
    other = next(batches(s.train, 64, resolution=32, shuffle=True, seed=2))
    assert not torch.equal(other[1], xs[0][1])
    assert next(batches(s.test, 500, resolution=12))[0].shape == (360, 1, 12, 12)


def test_max_train_subsamples():
    s = load_splits("digits", max_train=300, max_test=100)
    assert len(s.train) + len(s.proxy) == 300 and len(s.test) == 100


def test_missing_fashion_mnist_names_path(tmp_path):
    with pytest.raises(EtaError) as e:
        load_splits("fashion_mnist", root=str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value) and "dataset-fashion-mnist" in str(e.value)


def test_unknown_dataset():
    with pytest.raises(EtaError, match="known"):
        load_splits("imagenet-21k")


@pytest.mark.skipif(not FASHION_MNIST_ROOT.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    s = load_splits("fashion_mnist", max_test=None)
    assert len(s.train) + len(s.proxy) == 60000 and len(s.test) == 10000
    assert (s.num_classes, s.in_chans, s.native_resolution) == (10, 1, 28)
