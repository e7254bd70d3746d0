"""How a latency is measured on a noisy machine: warm-up, repeats, median, spread, re-measure."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..locks import timing_device, timing_lock
from . import steadiness
from .steadiness import Steadiness


@dataclass
class Protocol:
    """Median of ``repeat`` timings, each the mean of ``number`` runs (None: enough runs for ~10 ms).

    An entry whose relative spread (IQR / median) exceeds ``max_cv`` is measured again, up to
    ``retries`` times, and the tightest attempt is kept. On a CPU, each attempt waits (up to
    ``settle_s``) until the machine runs within ``max_slowdown`` of its usual speed, and one the
    machine slowed down during is timed again (``steadiness``); None turns the check off.
    """

    warmup: int = 3
    number: int | None = None
    repeat: int = 7
    max_cv: float = 0.05
    retries: int = 2
    min_repeat_ms: float = 10.0
    max_slowdown: float | None = 1.25
    settle_s: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, latency) -> "Protocol":
        """The protocol a space's ``latency`` settings name."""
        return cls(number=latency.number, repeat=latency.repeat, max_cv=latency.max_spread, max_slowdown=latency.max_slowdown,
                   settle_s=latency.settle_s)


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
    slowdown: float | None = None  # the machine's slowdown around the kept attempt (steadiness; None: not checked)


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
                     device: str = "cpu", machine: Steadiness | None = None) -> Measurement:
    """Apply the protocol to a backend: ``timer(number, repeat)`` returns per-repeat mean ms.

    ``one_run`` runs once (for warm-up). Everything here runs under ``device``'s machine-wide timing
    lock, so two processes never time at once; ``timing_s`` is the wall time spent timing. CPU
    timings are taken while the host runs at its usual speed (``machine``: default, this host's).
    """
    if timing_device(device) == "cpu" and protocol.max_slowdown is not None:
        machine = machine or steadiness.machine()
    else:
        machine = None
    with timing_lock(device):
        start = time.time()
        m = _measure(timer, one_run, protocol, machine)
        m.timed_at = (start, time.time())
    return m


def _measure(timer, one_run, protocol: Protocol, machine: Steadiness | None = None) -> Measurement:
    t0 = time.perf_counter()
    settle_until = t0 + (machine.patience(protocol.settle_s) if machine else 0.0)
    for _ in range(protocol.warmup):
        one_run()
    number = protocol.number or choose_number(timer, protocol.min_repeat_ms)
    best, attempts = None, 0
    while attempts <= protocol.retries:
        before = machine.wait(protocol.max_slowdown, max(0.0, settle_until - time.perf_counter())) if machine else None
        samples = [float(s) for s in timer(number, protocol.repeat)]
        slowdown = max(before, machine.slowdown()) if machine else None
        steady = _steady(slowdown, protocol)
        if not steady and time.perf_counter() < settle_until:
            continue  # the machine slowed down during the attempt: time it again while there is time to wait
        attempts += 1
        m = Measurement(float(np.median(samples)), relative_spread(samples), len(samples), samples, number=number,
                        slowdown=slowdown)
        if best is None or _better(m, best, protocol):
            best = m
        if m.spread <= protocol.max_cv and steady:
            break
        if protocol.number is None and m.median_ms * number < protocol.min_repeat_ms / 2:
            # sized during a slow spell (first runs, a busy neighbour): repeats are too short to be stable
            number = choose_number(timer, protocol.min_repeat_ms)
    best.timing_s = time.perf_counter() - t0
    if machine:
        machine.timed(_steady(best.slowdown, protocol))
    return best


def _steady(slowdown: float | None, protocol: Protocol) -> bool:
    return slowdown is None or slowdown <= protocol.max_slowdown


def _better(m: Measurement, best: Measurement, protocol: Protocol) -> bool:
    """An attempt on a steady machine beats one on a slowed machine; among equals, the tighter spread wins."""
    if _steady(m.slowdown, protocol) != _steady(best.slowdown, protocol):
        return _steady(m.slowdown, protocol)
    return m.spread < best.spread
