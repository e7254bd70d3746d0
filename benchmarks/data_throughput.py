"""Teacher-training throughput on an image folder: eta's ``fit`` against a plain timm-style loop.

Both train the same timm model from the same initial weights on the same folder, with the same
batch size, DataLoader workers and threads. The plain loop is what a timm user writes: torchvision
``ImageFolder`` (decode, resize, ``ToTensor``, ``Normalize`` per image, every epoch) + ``DataLoader``
+ ``torch.optim.AdamW`` + cross-entropy. eta runs twice: with the folder decoded once and cached as
uint8 (``data.cache: auto``, what a CIFAR-sized folder gets), and read lazily through DataLoader
workers (``data.cache: none``, what an ImageNet-sized folder gets). Images per second are measured
over the epochs after the first (worker start-up and the first decode are reported separately).
eta's loop runs convolutions channels-last, so the plain loop is also timed with timm's
``--channels-last`` to tell the data path's share of the difference from the memory format's.

    python -m benchmarks.data_throughput                        # 2,000 generated 32x32 PNGs
    python -m benchmarks.data_throughput --root /data/cifar10-folder --images 0 --epochs 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eta.pareto import format_table

from .common import run_command, setup_logging


def make_folder(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` training PNGs (and n/10 for val) of ``size`` px in ``classes`` folders, smooth random pictures."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            c = i % classes
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            base[..., c % 3] = 40 + 20 * c  # a class cue, so the loss can fall
            Image.fromarray(base).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return root


def _model(name: str, classes: int):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes)


def plain_loop(root: Path, *, model_name: str, epochs: int, batch_size: int, workers: int, resolution: int,
               channels_last: bool = False) -> dict:
    """The timm-style loop: ImageFolder + DataLoader + AdamW (timm's --channels-last optional); seconds per epoch."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    data = ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    model = _model(model_name, len(data.classes))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    times, images = [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += len(y)
        times.append(time.perf_counter() - t0)
    return {"epoch_s": times, "images_per_epoch": images // epochs, "load_s": 0.0, "loss": loss.item()}


def eta_fit(root: Path, *, model_name: str, epochs: int, batch_size: int, workers: int, resolution: int, cache: str) -> dict:
    """eta's teacher training on the folder (load_splits + fit); seconds per epoch and to load."""
    from eta.data import load_splits, num_batches
    from eta.train import fit

    t0 = time.perf_counter()
    splits = load_splits("image_folder", root=str(root), decode_size=resolution, cache=cache, workers=workers,
                         proxy_fraction=0.01)
    load_s = time.perf_counter() - t0
    model = _model(model_name, splits.num_classes)
    stamps = [time.perf_counter()]
    history = fit(model, splits.train, epochs=epochs, lr=1e-3, weight_decay=0.05, batch_size=batch_size,
                  resolutions=[resolution], progress=False, workers=workers,
                  on_epoch=lambda e, m: stamps.append(time.perf_counter()))
    return {"epoch_s": list(np.diff(stamps)), "images_per_epoch": num_batches(splits.train, batch_size, drop_last=True) * batch_size,
            "load_s": load_s, "loss": history[-1]["train_loss"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="an image folder with train/ and val/; default: generate one")
    p.add_argument("--images", type=int, default=2000, help="training images to generate (without --root)")
    p.add_argument("--size", type=int, default=32, help="side of the generated images")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ETA_CACHE_DIR", str(Path(tmp) / "cache"))  # the first eta load decodes, as a new user's does
        root = Path(args.root) if args.root else make_folder(Path(tmp) / "images", args.images, args.size)
        common = dict(model_name=args.model, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                      resolution=args.resolution)
        runs = [("plain timm loop (ImageFolder + DataLoader)", plain_loop(root, **common)),
                ("plain timm loop, --channels-last", plain_loop(root, channels_last=True, **common)),
                ("eta fit, decoded once, uint8 in memory", eta_fit(root, cache="auto", **common)),
                ("eta fit, lazy (DataLoader workers)", eta_fit(root, cache="none", **common))]
    base = None
    rows = []
    for name, r in runs:
        steady = r["epoch_s"][1:] or r["epoch_s"]
        ips = r["images_per_epoch"] * len(steady) / sum(steady)
        base = base or ips
        rows.append({"loop": name, "first": r["epoch_s"][0], "steady": sum(steady) / len(steady), "ips": ips,
                     "rel": ips / base, "load": r["load_s"], "loss": r["loss"]})
    print(f"\n{args.model} at {args.resolution} px, batch {args.batch_size}, {args.workers} workers, {args.threads} threads, "
          f"{runs[0][1]['images_per_epoch']} images per epoch, {args.epochs} epochs ({os.cpu_count()} CPUs)\n")
    print(format_table(rows, [("loop", "loop", "s"), ("load", "load s", ".2f"), ("first", "1st epoch s", ".2f"),
                              ("steady", "epoch s", ".2f"), ("ips", "images/s", ".0f"), ("rel", "vs plain", ".2f"),
                              ("loss", "last loss", ".3f")]))


if __name__ == "__main__":
    run_command(main)
