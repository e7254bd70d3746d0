"""Locks between processes that share a machine or a run directory.

- One owner per run directory (:func:`run_lock`): a second process refuses at once, naming the holder.
- One timing at a time per device (:func:`timing_lock`): measurements on one machine would disturb
  each other, so a timing waits for the one in progress and says what it waits for.
- One writer at a time per shared file (:func:`file_lock`): writers re-read and merge under it.

All are ``flock`` locks on small files that record their holder (pid, host, command, since when):
the kernel releases them when the holder dies, even by SIGKILL, so a lock left behind is taken over
safely. Within one process the locks are re-entrant (a phase that holds the timing lock may call a
measurement that takes it again).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import EtaError

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "ETA_LOCK_DIR"
_held: dict[str, list] = {}  # path -> [fd, depth] for re-entrance within this process
_guard = threading.Lock()


def _holder_info(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def holder(path: Path) -> dict | None:
    """Who holds (or last held) the lock at ``path``, from the record in the lock file."""
    try:
        return json.loads(Path(path).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('what')}: {info.get('command')}) since {info.get('since')}"


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def _flock(path: Path, what: str, *, wait: bool, wait_message: str = "", poll_s: float = 0.2, report_every_s: float = 30.0):
    path = Path(path)
    key = str(path.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _guard:
                entry[1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_flock(fd):
            if not wait:
                raise EtaError(f"{what}: held by {describe_holder(holder(path))}")
            log.info("%s: waiting for %s", wait_message or what, describe_holder(holder(path)))
            waited, last = time.monotonic(), time.monotonic()
            while not _try_flock(fd):
                time.sleep(poll_s)
                if time.monotonic() - last > report_every_s:
                    log.info("%s: still waiting (%.0f s) for %s", wait_message or what, time.monotonic() - waited, describe_holder(holder(path)))
                    last = time.monotonic()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info(what)).encode(), 0)
        with _guard:
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            with _guard:
                del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def run_lock(root: Path):
    """Own the run directory ``root`` for the whole command; refuse in one line if another process does."""
    root = Path(root)
    try:
        with _flock(root / ".lock", "run", wait=False):
            yield
    except EtaError as err:
        if str(err).startswith("run: held by"):
            raise EtaError(f"run {root} is in use: {str(err).removeprefix('run: ')}; wait for it to finish or stop it") from None
        raise


def lock_dir() -> Path:
    """Machine-wide lock folder (``$ETA_LOCK_DIR``, else one in the system's temporary folder)."""
    root = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "eta-locks")
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            root.chmod(0o1777)  # every user of the machine times on the same device
        except OSError:
            pass
    return root


def _device_slug(device: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(device).lower()).strip("-") or "cpu"


def timing_device(device) -> str:
    """The lock a timing on ``device`` (a TVM or torch device, or its name) takes: ``cuda`` or ``cpu``."""
    return "cuda" if "cuda" in str(device) else "cpu"


@contextmanager
def timing_lock(device: str = "cpu", what: str = "timing"):
    """Hold the machine-wide timing lock of ``device`` (``cpu``, ``cuda:0``) while timing."""
    with _flock(lock_dir() / f"timing-{_device_slug(device)}.lock", what, wait=True, wait_message=f"timing on {device}"):
        yield


@contextmanager
def file_lock(path: Path):
    """Exclusive access to a shared file for a read-merge-write (the lock is a sidecar ``<file>.lock``)."""
    path = Path(path)
    with _flock(path.with_name(path.name + ".lock"), f"writing {path.name}", wait=True, wait_message=f"writing {path}"):
        yield
