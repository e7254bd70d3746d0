"""Test-only fault injection: make a phase's Ray worker die, to prove that a search survives it.

``ETA_FAULT_INJECT=phase:count:marker_dir`` (several specs separated by ``,``) makes the first
``count`` units of ``phase`` (``pretrain``: a block group, ``solve``: a chunk of sampled students,
``finetune``: a trial, after its first epoch) kill their own process with SIGKILL, as a crashed or
preempted worker would, after their work is done but before its result reaches the driver. Each
death claims one marker file ``marker_dir/<phase>-<i>`` (created exclusively, so concurrent workers
and retries in other processes count together); once all ``count`` markers exist, units run normally.

The driver reads the variable (:func:`spec`) and its tasks and trials carry it in their
:class:`eta.raycluster.TaskContext`, which installs it in the worker (:func:`install`), so it works
whatever environment the Ray workers were started with. Unset, nothing happens.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "ETA_FAULT_INJECT"
PHASES = ("pretrain", "solve", "finetune")


def spec() -> str | None:
    """The driver's fault-injection setting (None when unset), to pass to tasks and trials."""
    return os.environ.get(ENV) or None


_installed: str | None = None  # the setting of the task running in this process


def install(fault: str | None) -> None:
    global _installed
    _installed = fault


def _parse(text: str) -> list[tuple[str, int, Path]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            phase, count, marker_dir = item.split(":", 2)
            out.append((phase, int(count), Path(marker_dir)))
        except ValueError:
            raise ValueError(f"{ENV}: expected 'phase:count:marker_dir', got {item!r}") from None
        if phase not in PHASES:
            raise ValueError(f"{ENV}: unknown phase {phase!r} (one of {', '.join(PHASES)})")
    return out


def maybe_die(phase: str, unit: str) -> None:
    """SIGKILL this process if the installed setting still owes ``phase`` a death."""
    fault = _installed
    if not fault:
        return
    for p, count, marker_dir in _parse(fault):
        if p != phase:
            continue
        marker_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            try:
                fd = os.open(marker_dir / f"{phase}-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"{unit}\npid {os.getpid()}\n".encode())
            os.close(fd)
            log.warning("%s: killing this worker (pid %d) during %s, unit %s", ENV, os.getpid(), phase, unit)
            os.kill(os.getpid(), signal.SIGKILL)
