"""Training augmentation: presets per data set, seeded, on whole batches where it can be.

Geometric augmentation (random shifts, random-resized crops, horizontal flips) runs on the batch
tensor with one ``affine_grid``/``grid_sample`` call, on whatever device the batch is on, so
in-memory sets stay fast on a GPU. Per-image PIL work (timm's RandAugment, colour jitter) runs in
DataLoader workers through ``timm.data.create_transform``. Mixup/CutMix is timm's ``Mixup`` on the
batch. Every random draw comes from the batch's (or item's) own seed, so the same seed gives the
same batches and a killed run that resumes replays them exactly. Evaluation is never augmented.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EtaError

log = logging.getLogger(__name__)

PRESETS = ("none", "light", "standard", "strong")
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
NO_FLIP = ("digits",)  # a mirrored 2 is no 2


@dataclass(frozen=True)
class Augment:
    """Resolved augmentation of training batches (what a preset and the space's fields amount to)."""

    crop: str = "none"  # none | shift (pad-and-crop by up to ``shift`` of the side) | resized (random-resized crop)
    shift: float = 0.0
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.0
    rand_augment: str | None = None
    color_jitter: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    num_classes: int = 0
    pretrain: bool = False  # also augment the pretrain phase's distillation batches

    @property
    def active(self) -> bool:
        return self.crop != "none" or self.hflip > 0 or self.per_image or self.mixes

    @property
    def per_image(self) -> bool:
        """Whether some of it needs per-image PIL transforms (DataLoader workers)."""
        return bool(self.rand_augment) or self.color_jitter > 0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    # --- on batches -----------------------------------------------------------------------------
    def geometric(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Random crop / shift / flip of a float batch (N, C, H, W), drawn from ``seed``; zeros outside the image."""
        if self.crop == "none" and self.hflip <= 0:
            return x
        n, _, h, w = x.shape
        g = torch.Generator().manual_seed(int(seed))
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.crop == "resized":
            area = torch.empty(n, dtype=torch.float64).uniform_(*self.scale, generator=g)
            log_ratio = torch.empty(n, dtype=torch.float64).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
            cw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
            ch = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
            theta[:, 0, 0], theta[:, 1, 1] = cw, ch
            theta[:, 0, 2] = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - cw)
            theta[:, 1, 2] = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * (1 - ch)
        elif self.crop == "shift":
            px, py = round(self.shift * w), round(self.shift * h)
            # whole-pixel shifts: grid points land on pixel centres, so pixels are copied, not blended
            theta[:, 0, 2] = torch.randint(-px, px + 1, (n,), generator=g).double() * 2 / w
            theta[:, 1, 2] = torch.randint(-py, py + 1, (n,), generator=g).double() * 2 / h
        if self.hflip > 0:
            flip = torch.rand(n, generator=g, dtype=torch.float64) < self.hflip
            theta[flip, 0, 0] *= -1
        grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def mix(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup/CutMix on a batch: soft targets (N, classes), label smoothing folded in."""
        from timm.data import Mixup
        from timm.data.mixup import mixup_target

        if self.num_classes < 2:
            raise EtaError("data.augment: mixup/cutmix need the number of classes (resolve the augmentation with num_classes)")
        if len(x) % 2:  # timm mixes a batch with its mirror; an odd last batch stays unmixed
            return x, mixup_target(y, self.num_classes, 1.0, self.label_smoothing)
        mixer = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, label_smoothing=self.label_smoothing,
                      num_classes=self.num_classes)
        with numpy_seeded(seed):  # timm draws lambda from numpy's global generator
            return mixer(x, y)

    # --- on images (DataLoader workers) --------------------------------------------------------
    def after_images(self) -> "Augment":
        """What is left for the batch once per-image transforms ran (their crop, flip, RandAugment done)."""
        return replace(self, crop="shift" if self.crop == "shift" else "none", hflip=0.0, rand_augment=None, color_jitter=0.0)

    def image_transform(self, size: int, mean: tuple):
        """timm's training transform for one PIL image, ending in a uint8 tensor of ``size`` x ``size``."""
        from timm.data import create_transform

        crop_scale = self.scale if self.crop == "resized" else (1.0, 1.0)
        ratio = self.ratio if self.crop == "resized" else (1.0, 1.0)
        return create_transform(size, is_training=True, scale=crop_scale, ratio=ratio, hflip=self.hflip,
                                color_jitter=self.color_jitter, auto_augment=self.rand_augment,
                                interpolation="bilinear", mean=tuple(mean), normalize=False)


@contextlib.contextmanager
def numpy_seeded(seed: int):
    """numpy's global generator seeded for a block, then put back as it was (no global switch left behind)."""
    state = np.random.get_state()
    np.random.seed(int(seed) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


@contextlib.contextmanager
def all_seeded(seed: int):
    """Python's, numpy's and torch's CPU generators seeded for one item's transform, then restored."""
    py, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(int(seed))
    torch.manual_seed(int(seed))
    try:
        with numpy_seeded(seed):
            yield
    finally:
        random.setstate(py)
        torch.set_rng_state(torch_state)


# ---------------------------------------------------------------------------------------------
# presets and the space's settings


def preset(name: str, dataset: str) -> Augment:
    """What each preset means for a data set (``auto``: light for digit-like sets, standard for the rest)."""
    if name == "auto":
        name = "light" if dataset in ("digits", "fashion_mnist") else "standard"
    if name not in PRESETS:
        raise EtaError(f"data.augment: unknown preset '{name}' (known: auto, {', '.join(PRESETS)})")
    if name == "none":
        return Augment()
    if name == "light":  # small shifts, no flips: digits and clothes keep their handedness cues
        return Augment(crop="shift", shift=0.1)
    folder = dataset == "image_folder"
    base = Augment(crop="resized" if folder else "shift", shift=0.125, hflip=0.0 if dataset in NO_FLIP else 0.5)
    if name == "standard":  # CIFAR: pad 4 and crop at 32 px, flip; folders: timm's random-resized crop, flip
        return base
    return replace(base, rand_augment=RAND_AUGMENT, mixup=0.8, cutmix=1.0, label_smoothing=0.1)


FIELDS = ("crop", "shift", "scale", "ratio", "hflip", "rand_augment", "color_jitter", "mixup", "cutmix",
          "label_smoothing", "pretrain")


def resolve(setting, dataset: str, num_classes: int = 0) -> Augment:
    """The augmentation a space's ``data.augment`` names: a preset name, or a preset with fields changed.

    ``setting`` is a preset name, a mapping, or the space's pydantic settings object.
    """
    if setting is None:
        setting = "none"
    if isinstance(setting, str):
        return replace(preset(setting, dataset), num_classes=int(num_classes))
    fields = setting.model_dump() if hasattr(setting, "model_dump") else dict(setting)
    unknown = set(fields) - set(FIELDS) - {"preset"}
    if unknown:
        raise EtaError(f"data.augment: unknown field {sorted(unknown)[0]} (known: preset, {', '.join(FIELDS)})")
    aug = preset(fields.get("preset") or "auto", dataset)
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if k in FIELDS and v is not None}
    aug = replace(aug, **changes, num_classes=int(num_classes))
    if aug.crop not in ("none", "shift", "resized"):
        raise EtaError(f"data.augment.crop: '{aug.crop}' is not one of none, shift, resized")
    return aug


def for_space(space, num_classes: int) -> Augment:
    """The training augmentation of a search space (``data.augment``, defaults per data set)."""
    return resolve(space.data.augment, space.data.dataset, num_classes)
