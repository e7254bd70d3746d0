"""How a latency is measured on a noisy machine: warm-up, repeats, median, spread, re-measure."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Protocol:
    """Median of ``repeat`` timings, each the mean of ``number`` runs (None: enough runs for ~10 ms).

    An entry whose relative spread (IQR / median) exceeds ``max_cv`` is measured again, up to
    ``retries`` times, and the tightest attempt is kept.
    """

    warmup: int = 3
    number: int | None = None
    repeat: int = 7
    max_cv: float = 0.05
    retries: int = 2
    min_repeat_ms: float = 10.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measurement:
    median_ms: float
    spread: float
    repeats: int
    samples_ms: list = field(default_factory=list)
    compile_s: float = 0.0


def relative_spread(samples_ms) -> float:
    s = np.asarray(samples_ms, dtype=float)
    med = float(np.median(s))
    q75, q25 = np.percentile(s, [75, 25])
    return float((q75 - q25) / med) if med > 0 else 0.0


def measure_callable(timer: Callable[[int, int], list], one_run: Callable[[], None], protocol: Protocol) -> Measurement:
    """Apply the protocol to a backend: ``timer(number, repeat)`` returns per-repeat mean ms.

    ``one_run`` runs once (for warm-up and for choosing ``number``).
    """
    for _ in range(protocol.warmup):
        one_run()
    number = protocol.number
    if number is None:
        t0 = time.perf_counter()
        one_run()
        once_ms = max((time.perf_counter() - t0) * 1e3, 1e-4)
        number = int(min(10_000, max(1, np.ceil(protocol.min_repeat_ms / once_ms))))
    best = None
    for _ in range(1 + protocol.retries):
        samples = list(timer(number, protocol.repeat))
        m = Measurement(float(np.median(samples)), relative_spread(samples), protocol.repeat, [float(s) for s in samples])
        if best is None or m.spread < best.spread:
            best = m
        if m.spread <= protocol.max_cv:
            break
    return best
