"""How many threads torch computes with: set in one place, for a block of code or for a Ray task.

Work here runs with fewer threads than cores in two cases: tasks that share a node (each gets the
CPUs Ray reserved for it), and very small or float64 computations where thread hand-offs cost more
than they save (float64 depthwise convolutions of fake-quantized operators were ~80x slower with
several threads; the tiny accuracy-predictor MLP ~100x on a busy CPU).
"""
from __future__ import annotations

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
