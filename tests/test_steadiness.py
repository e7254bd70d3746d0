"""Timings wait for the machine's usual speed: a slow spell of the host must not become a table's figure."""
from __future__ import annotations

import time

import pytest

from eta.latency.protocol import Protocol, measure_callable
from eta.latency.steadiness import Steadiness, loop_ms


def readings(values):
    """A reference loop that reads ``values`` in turn, then the last one for ever."""
    values = list(values)

    def read():
        return values.pop(0) if len(values) > 1 else values[0]

    return read


def test_an_attempt_the_machine_slowed_down_during_is_timed_again():
    # fast before the first attempt, slow right after it; then slow twice while waiting, fast again
    machine = Steadiness(reading=readings([1.0, 2.0, 2.0, 2.0, 1.0, 1.0]))
    attempts = iter([[5.0] * 4, [3.0] * 4])
    m = measure_callable(lambda number, repeat: next(attempts), lambda: None,
                         Protocol(warmup=0, number=1, repeat=4, max_cv=0.05, retries=0, settle_s=5.0), machine=machine)
    # the slow attempt was tight (spread 0) and would have been kept without the check
    assert m.samples_ms == [3.0] * 4 and m.slowdown == pytest.approx(1.0)


def test_a_machine_that_stays_slow_is_timed_after_settle_s_and_says_so():
    machine = Steadiness(reading=readings([1.0, 2.0]))
    calls = []

    def timer(number, repeat):
        calls.append(number)
        return [4.0] * repeat

    t0 = time.perf_counter()
    m = measure_callable(timer, lambda: None, Protocol(warmup=0, number=1, repeat=3, retries=1, settle_s=0.2), machine=machine)
    assert time.perf_counter() - t0 < 2.0
    assert m.median_ms == 4.0 and m.slowdown == pytest.approx(2.0)


def test_gpu_timings_do_not_wait_for_the_host():
    def never():
        raise AssertionError("the host's speed was read for a GPU timing")

    m = measure_callable(lambda number, repeat: [1.0] * repeat, lambda: None, Protocol(warmup=0, number=1, repeat=3),
                         device="cuda:0", machine=Steadiness(reading=never))
    assert m.slowdown is None and m.median_ms == 1.0


def test_the_fastest_reading_is_shared_through_the_cache(tmp_path):
    path = tmp_path / "reference.json"
    first = Steadiness(reading=readings([3.0, 1.0]), path=path)
    assert first.slowdown() == 1.0 and first.slowdown() == 1.0  # the first reading is its own reference
    later = Steadiness(reading=readings([2.0]), path=path)  # a new process, started during a slow spell
    assert later.slowdown() == pytest.approx(2.0)
    path.write_text("{not json")
    assert Steadiness(reading=readings([2.0]), path=path).slowdown() == 1.0  # a damaged file: measured again


def test_the_reference_loop_measures_time():
    assert loop_ms(iterations=200_000) > loop_ms(iterations=2_000) > 0


def test_a_sustained_load_makes_only_the_first_timing_wait():
    machine = Steadiness(reading=readings([1.0, 2.0]))  # slow from the second reading on, for ever
    protocol = Protocol(warmup=0, number=1, repeat=3, retries=0, settle_s=1.0)

    def timed():
        t0 = time.perf_counter()
        measure_callable(lambda number, repeat: [1.0] * repeat, lambda: None, protocol, machine=machine)
        return time.perf_counter() - t0

    assert timed() >= 1.0  # a spell: worth waiting for
    assert timed() < 0.5  # still slow after a whole wait: a load, timed at once
    machine.reading = readings([1.0])  # the machine is back to its usual speed
    timed()
    machine.reading = readings([2.0])
    assert timed() >= 1.0  # a new spell is waited for again
