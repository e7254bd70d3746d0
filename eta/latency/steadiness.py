"""Whether this CPU runs at its usual speed right now, so that latencies are only taken while it does.

A shared machine's core can run much slower for a fraction of a second to many seconds (a neighbour
on its SMT sibling, a lowered clock); a network timed during such a spell reads slower by a factor
that varies with the neighbour, and two networks timed seconds apart are compared unfairly. A fixed
pure-Python loop, timed just before and after a measurement, tells the spells apart: its fastest
reading on this machine (kept in the cache, so every process starts from it) is the reference, and
``slowdown`` is how much slower it runs now.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..files import read_json, write_json
from ..paths import cache_subdir
from .host import cpu_name

log = logging.getLogger(__name__)

LOOP_ITERATIONS = 20_000
POLL_S = 0.02


def loop_ms(iterations: int = LOOP_ITERATIONS) -> float:
    """The best of three runs of a fixed arithmetic loop: one core's speed, with no memory traffic."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        s = 0.0
        for i in range(iterations):
            s += i * 0.5
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _reference_path() -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in cpu_name().lower()).strip("-") or "cpu"
    return cache_subdir("machine") / f"reference-{slug}-py{sys.version_info.major}{sys.version_info.minor}.json"


@dataclass
class Steadiness:
    """The reference loop's fastest reading on this machine, and how far the machine is from it now."""

    reading: Callable[[], float] = loop_ms
    path: Path | None = None  # where the fastest reading is kept across processes (None: this object only)
    fastest_ms: float = float("inf")
    _stored_ms: float = field(default=float("inf"), repr=False)
    _slow_since_last: bool = field(default=False, repr=False)  # the last timing found no steady moment within its wait

    def __post_init__(self):
        if self.path is not None and Path(self.path).exists():
            try:
                self._stored_ms = self.fastest_ms = min(self.fastest_ms, float(read_json(self.path)["fastest_ms"]))
            except Exception:  # noqa: BLE001 - a damaged file only loses the reference: it is measured again
                log.warning("machine reference %s unreadable: measured again", self.path)

    def slowdown(self) -> float:
        """How many times slower than its fastest the reference loop runs now (1.0: at its usual speed)."""
        ms = float(self.reading())
        if ms < self.fastest_ms:
            self.fastest_ms = ms
            if self.path is not None and ms < 0.98 * self._stored_ms:
                self._stored_ms = ms
                write_json(Path(self.path), {"cpu": cpu_name(), "python": sys.version.split()[0], "fastest_ms": ms,
                                             "loop_iterations": LOOP_ITERATIONS})
        return ms / self.fastest_ms

    def patience(self, settle_s: float) -> float:
        """How long the next timing may wait: ``settle_s``, or a moment while the last one found the machine slow
        throughout (a sustained load, not a spell: waiting would only make every timing ``settle_s`` longer)."""
        return min(settle_s, 5 * POLL_S) if self._slow_since_last else settle_s

    def timed(self, steady: bool) -> None:
        """Note whether the last timing found a steady moment."""
        self._slow_since_last = not steady

    def wait(self, max_slowdown: float, settle_s: float) -> float:
        """Wait up to ``settle_s`` seconds for a slowdown of at most ``max_slowdown``; returns the last slowdown."""
        deadline = time.perf_counter() + settle_s
        s = self.slowdown()
        while s > max_slowdown and time.perf_counter() < deadline:
            time.sleep(POLL_S)
            s = self.slowdown()
        return s


_machines: dict[Path, Steadiness] = {}


def machine() -> Steadiness:
    """This process's view of the host CPU, one per cache directory (whose file shares the fastest reading)."""
    path = _reference_path()
    if path not in _machines:
        _machines[path] = Steadiness(path=path)
    return _machines[path]
