"""How a latency is measured on a noisy machine: warm-up, repeats, median, spread, re-measure."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..locks import timing_lock


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
    timing_s: float = 0.0
    number: int = 0  # runs averaged per sample
    timed_at: tuple = ()  # (start, end) of the timing, seconds since the epoch, under the device's timing lock
    cache_hit: bool = False  # the compiled module came from the compiled-module cache
    schedules: str | None = None  # digest of the tuned schedules it ran (None: untuned)


def relative_spread(samples_ms) -> float:
    s = np.asarray(samples_ms, dtype=float)
    med = float(np.median(s))
    q75, q25 = np.percentile(s, [75, 25])
    return float((q75 - q25) / med) if med > 0 else 0.0


def choose_number(timer: Callable[[int, int], list], min_repeat_ms: float, cap: int = 100_000) -> int:
    """Runs per repeat so that one repeat lasts at least ``min_repeat_ms``, estimated with the backend's own timer.

    A single run overstates the per-run time (timer and synchronisation overhead; 2x for small
    GPU kernels), so the estimate is refined with batches until one lasts a quarter of the goal.
    Each estimate is the faster of two batches: on a shared machine one batch can be descheduled,
    and a 5x overestimate left ``number`` too small for a stable median.
    """
    number = 1
    for _ in range(6):
        per_run_ms = max(min(float(s) for s in timer(number, 2)), 1e-6)
        if per_run_ms * number >= min_repeat_ms / 4 or number >= cap:
            break
        number = int(min(cap, max(2 * number, np.ceil(min_repeat_ms / 4 / per_run_ms))))
    return int(min(cap, max(1, np.ceil(min_repeat_ms / per_run_ms))))


def measure_callable(timer: Callable[[int, int], list], one_run: Callable[[], None], protocol: Protocol,
                     device: str = "cpu") -> Measurement:
    """Apply the protocol to a backend: ``timer(number, repeat)`` returns per-repeat mean ms.

    ``one_run`` runs once (for warm-up). Everything here runs under ``device``'s machine-wide timing
    lock, so two processes never time at once; ``timing_s`` is the wall time spent timing.
    """
    with timing_lock(device):
        start = time.time()
        m = _measure(timer, one_run, protocol)
        m.timed_at = (start, time.time())
    return m


def _measure(timer, one_run, protocol: Protocol) -> Measurement:
    t0 = time.perf_counter()
    for _ in range(protocol.warmup):
        one_run()
    number = protocol.number or choose_number(timer, protocol.min_repeat_ms)
    best = None
    for _ in range(1 + protocol.retries):
        samples = [float(s) for s in timer(number, protocol.repeat)]
        m = Measurement(float(np.median(samples)), relative_spread(samples), len(samples), samples, number=number)
        if best is None or m.spread < best.spread:
            best = m
        if m.spread <= protocol.max_cv:
            break
        if protocol.number is None and m.median_ms * number < protocol.min_repeat_ms / 2:
            # sized during a slow spell (first runs, a busy neighbour): repeats are too short to be stable
            number = choose_number(timer, protocol.min_repeat_ms)
    best.timing_s = time.perf_counter() - t0
    return best
