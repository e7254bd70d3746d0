"""DataLoader plumbing for sets read item by item: worker processes, pinned memory, seeded items.

A phase asks :func:`eta.data.batches` for one pass at a time; the loader behind it is built once per
data set and setting and kept, so its workers persist from one pass to the next. Each pass hands
the loader a plan (the batches, and a seed per item), so which images form a batch and how each is
augmented depend on the run's seed alone: not on the number of workers, nor on which worker read
what, nor on whether the run was killed and resumed in between.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .augment import all_seeded
from .errors import EtaError
from .image_folder import Unreadable

log = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """DataLoader workers when the space names none: up to 4, never more than the CPUs."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


class _Plan(Sampler):
    """The batches of the current pass, each a list of (item, seed); set before every pass."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SeededItems(Dataset):
    """Items read by ``read(i)`` (a tensor), or opened by ``open_pil(i)`` and transformed under the item's seed."""

    def __init__(self, read: Callable, labels, *, open_pil: Callable | None = None, transform: Callable | None = None):
        self.read, self.labels, self.open_pil, self.transform = read, labels, open_pil, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, seed = key
        try:
            if self.transform is None:
                x = self.read(i)
            else:
                with all_seeded(seed):
                    x = self.transform(self.open_pil(i))
        except EtaError as err:
            return Unreadable(str(err))
        return x, self.labels[i]


def _collate(items):
    bad = next((it for it in items if isinstance(it, Unreadable)), None)
    return bad if bad is not None else default_collate(items)


class Loader:
    """One DataLoader over ``items`` whose passes follow plans; workers persist between passes."""

    def __init__(self, items: Dataset, *, workers: int, pin_memory: bool, prefetch_factor: int = 2):
        self.plan = _Plan()
        self.workers = int(workers)
        self.loader = DataLoader(items, batch_sampler=self.plan, num_workers=self.workers, collate_fn=_collate,
                                 pin_memory=pin_memory, persistent_workers=self.workers > 0,
                                 prefetch_factor=prefetch_factor if self.workers > 0 else None)

    def run(self, batches: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.plan.batches = batches
        for batch in self.loader:
            if isinstance(batch, Unreadable):
                raise EtaError(batch.message)
            yield batch


def loader_for(dataset, key, make_items: Callable[[], Dataset], *, workers: int, pin_memory: bool) -> Loader:
    """The loader kept on ``dataset`` for ``key`` (built on first use)."""
    cache = dataset.__dict__.setdefault("_loaders", {})
    full_key = (key, int(workers), bool(pin_memory))
    if full_key not in cache:
        cache[full_key] = Loader(make_items(), workers=workers, pin_memory=pin_memory)
    return cache[full_key]
