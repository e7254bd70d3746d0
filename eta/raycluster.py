"""Ray for eta: a session (local cluster or an existing one), tasks that carry their context, progress.

A task's body runs in a worker process that shares nothing with the driver but what is sent, so
every eta task is submitted with a :class:`TaskContext`: the torch threads it may use, the
operator families registered on the driver beyond eta's own (a user's or a test's), and the
test-only fault injection setting. The context is installed before the body runs, so task bodies
need none of it as parameters.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import faults, families
from .threads import set_threads

log = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Use a running Ray session if there is one, else start (and later stop) one.

    ``address``: ``auto``, ``ray://host:10001``, ``host:6379``, or None for a local cluster bound
    to loopback with ``num_cpus`` CPUs (default: all). Starting Ray replaces the process's SIGTERM
    handler with one that exits at once (no unwinding, no lock released); a Python handler set
    before (the CLI's: stop as on Ctrl-C) is put back.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local",  # a new cluster of our own, even when another one runs on this machine
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    if callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield ray
    finally:
        ray.shutdown()


def cpu_slots(task_cpus: float) -> int:
    """How many tasks of ``task_cpus`` CPUs the connected cluster runs at once."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    return max(1, int(total // max(task_cpus, 1e-9)))


@dataclass
class TaskContext:
    """What a task needs set before its body runs, taken from the driver when it is submitted."""

    threads: int | None = None
    fault: str | None = None
    extra_families: list = field(default_factory=list)

    @classmethod
    def from_driver(cls, threads: int | None = None) -> "TaskContext":
        extra = families.added_outside("eta")
        if extra:
            import ray.cloudpickle

            for fam in extra:  # a family defined in a user's script or a test travels by value
                ray.cloudpickle.register_pickle_by_value(sys.modules[type(fam).__module__])
        return cls(threads, faults.spec(), extra)

    def install(self) -> None:
        if self.threads is not None:
            set_threads(self.threads)
        known = set(families.names())
        for fam in self.extra_families:
            if fam.name not in known:
                families.register(fam)
        faults.install(self.fault)


def _run_in_context(context: TaskContext, fn: Callable, *args, **kwargs):
    context.install()
    return fn(*args, **kwargs)


class Task:
    """``fn`` as a Ray task (``options`` as for ``ray.remote``), run in the driver's :class:`TaskContext`."""

    def __init__(self, fn: Callable, *, threads: int | None = None, **options):
        import ray

        self.fn = fn
        self.threads = threads
        self._remote = ray.remote(_run_in_context).options(**options)

    def submit(self, *args, **kwargs):
        return self._remote.remote(TaskContext.from_driver(self.threads), self.fn, *args, **kwargs)


def nodes_holding(resource: str) -> int:
    """How many alive nodes of the connected cluster hold ``resource``."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) >= 1)


def completed(refs: Iterable, *, desc: str, total: int, progress: bool = True, count: Callable = lambda result: 1) -> Iterator:
    """(ref, result) as each task finishes, with a progress bar of ``total`` units (``count(result)`` per task)."""
    import ray
    from tqdm.auto import tqdm

    remaining = list(refs)
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            result = ray.get(done[0])
            yield done[0], result
            bar.update(count(result))
