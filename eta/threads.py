"""How many threads torch computes with: set in one place, for a block of code or for a Ray task.

Work here runs with fewer threads than cores in two cases: tasks that share a node (each gets the
CPUs Ray reserved for it), and very small or float64 computations where thread hand-offs cost more
than they save (float64 depthwise convolutions of fake-quantized operators were ~80x slower with
several threads; the tiny accuracy-predictor MLP ~100x on a busy CPU). How many cores a training
loop leaves to other work (compiling) follows from the same count.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


@contextmanager
def torch_threads(n: int = 1):
    """Run the block with ``n`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def idle_cores(busy: float) -> int:
    """CPU cores of this machine left to other work while ``busy`` of them compute."""
    return max(0, (os.cpu_count() or 1) - math.ceil(busy))


def cores_idle_while_training(device) -> int:
    """CPU cores a training loop in this process leaves to other work: all but one when it computes on an
    accelerator; on the CPU all but torch's threads (by default one per core, so none)."""
    return idle_cores(1 if torch.device(device).type != "cpu" else torch.get_num_threads())
