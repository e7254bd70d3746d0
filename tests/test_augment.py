"""Augmentation: what the presets mean per data set, exact batch geometry, seeded mixup, and fit with it."""
import random

import numpy as np
import pytest
import torch

from eta.augment import Augment, all_seeded, resolve
from eta.data import batches, load_splits
from eta.errors import EtaError
from eta.space import DataConfig
from eta.train import fit


def test_presets_per_data_set():
    assert resolve("auto", "digits").crop == "shift" and resolve("auto", "digits").hflip == 0
    assert resolve("auto", "fashion_mnist").hflip == 0
    cifar = resolve("auto", "cifar10")
    assert (cifar.crop, cifar.shift, cifar.hflip) == ("shift", 0.125, 0.5)  # pad 4 and crop at 32 px, flip
    assert resolve("standard", "image_folder").crop == "resized"
    assert resolve("standard", "digits").hflip == 0  # never mirror digits unless asked
    strong = resolve("strong", "cifar10", 10)
    assert strong.rand_augment.startswith("rand-m9") and strong.mixup > 0 and strong.num_classes == 10
    assert not resolve("none", "cifar10").active
    # the space's fields change a preset; an explicit flip on digits is the user's call
    cfg = DataConfig(dataset="digits", resolution=32, augment={"preset": "standard", "hflip": 0.5, "scale": [0.5, 1]})
    aug = resolve(cfg.augment, "digits")
    assert aug.hflip == 0.5 and aug.scale == (0.5, 1.0) and aug.crop == "shift"
    with pytest.raises(EtaError, match="unknown preset 'wild'"):
        resolve("wild", "digits")
    with pytest.raises(EtaError, match="unknown field"):
        resolve({"preset": "light", "rotate": 10}, "digits")


def test_shift_and_flip_move_whole_pixels():
    x = torch.rand(16, 2, 8, 8)
    shifted = Augment(crop="shift", shift=0.25).geometric(x, seed=3)
    flipped = Augment(hflip=1.0).geometric(x, seed=3)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-6)
    moved = 0
    for a, b in zip(x, shifted):  # each image is the original shifted by whole pixels, zeros coming in
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(a)
                ys, yd = (slice(dy, 8), slice(0, 8 - dy)) if dy >= 0 else (slice(0, 8 + dy), slice(-dy, 8))
                xs, xd = (slice(dx, 8), slice(0, 8 - dx)) if dx >= 0 else (slice(0, 8 + dx), slice(-dx, 8))
                ref[:, yd, xd] = a[:, ys, xs]
                found = found or torch.allclose(b, ref, atol=1e-5)
        assert found
        moved += not torch.allclose(a, b)
    assert moved > 8
    assert torch.equal(shifted, Augment(crop="shift", shift=0.25).geometric(x, seed=3))


def test_resized_crop_keeps_a_part_of_the_image():
    x = torch.arange(32.0).repeat(32, 1)[None, None].expand(8, 1, 32, 32).contiguous()  # value = column
    out = Augment(crop="resized", scale=(0.25, 0.25), ratio=(1, 1)).geometric(x, seed=0)
    widths = out[:, 0, 16].amax(1) - out[:, 0, 16].amin(1)  # a quarter of the area: half the width
    assert torch.allclose(widths, torch.full((8,), 15.5), atol=1.0)


def test_mixup_is_seeded_and_leaves_global_generators_alone():
    aug = resolve("strong", "cifar10", 10)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8)
    np_state, py_state, torch_state = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
    a = aug.mix(x.clone(), y, seed=5)
    b = aug.mix(x.clone(), y, seed=5)
    c = aug.mix(x.clone(), y, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[1].shape == (8, 10) and torch.allclose(a[1].sum(1), torch.ones(8))
    with all_seeded(1):
        random.random(), np.random.rand(), torch.rand(1)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    odd = aug.mix(x[:7].clone(), y[:7], seed=5)  # an odd batch stays unmixed, with smoothed targets
    assert torch.equal(odd[0], x[:7]) and torch.allclose(odd[1].argmax(1), y[:7])


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_fit_with_augmentation_is_reproducible():
    s = load_splits("digits", max_train=256, max_test=64)
    light = resolve("auto", "digits", s.num_classes)
    plain = list(batches(s.train, 32, resolution=16, shuffle=True, seed=7))
    augmented = list(batches(s.train, 32, resolution=16, shuffle=True, seed=7, augment=light))
    assert not torch.equal(plain[0][0], augmented[0][0]) and torch.equal(plain[0][1], augmented[0][1])
    kw = dict(epochs=2, lr=3e-3, weight_decay=0.0, batch_size=32, resolutions=[16], seed=1, progress=False)
    runs = [fit(m := _tiny(), s.train, augment=light, **kw) + [m] for _ in range(2)]
    assert runs[0][:-1] == runs[1][:-1]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][-1].parameters(), runs[1][-1].parameters()))
    unaugmented = fit(_tiny(), s.train, **kw)
    assert unaugmented[-1]["train_loss"] != runs[0][-2]["train_loss"]
    strong = resolve("strong", "digits", s.num_classes)  # mixup: soft targets through the same loop
    assert fit(_tiny(), s.train, augment=strong, **kw)[-1]["train_loss"] > 0
    with pytest.raises(EtaError, match="even batch size"):
        fit(_tiny(), s.train, augment=strong, **{**kw, "batch_size": 31})
