"""The latency lookup table: one JSON file per (backend, target, device, schedule policy), shared across searches.

Format (``eta-latency-table/1``)::

    {"format": ..., "provenance": {backend, target, device, schedule, tvm_version, torch_version, created, protocol},
     "entries": {key: {signature, input_shape, bits, executable, median_ms, spread, repeats,
                       samples_ms, number, compile_s, timing_s, protocol, measured_at, [kernel_dtype], [reason]}},
     "calibrations": {space key: {a, b, students, before, after, ...}},
     "stale": [{"provenance": ..., "entries": ...}, ...]}

A key is ``signature|input shape|bits``; the signature names the operator and hashes its
structure. Entries measured under different provenance (another backend, target, device, schedule
policy, or version of the software that runs them: TVM for ``tvm``, PyTorch for ``torch``) are never
reused: opening such a file warns, and the next save moves its entries aside into ``stale``.

The schedule policy is part of what a number means: ``untuned`` (TVM's default schedules),
``metaschedule:N`` (N MetaSchedule trials per workload; the tuning database sits beside the table in
``<table>-db/`` so deployed students compile with the same schedules), ``eager`` or ``torch.compile``.
A bit-width is measured with integer kernels where the backend has them; where it has none the entry
says so (``executable: false`` and a reason) rather than being timed in float.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

from .. import paths
from ..errors import EtaError
from ..files import write_json
from ..locks import file_lock
from . import backends
from .backends import measure_entry, uses_schedules
from .protocol import Protocol
from .schedules import RECORDS, best_records, target_slug, unpack

log = logging.getLogger(__name__)

FORMAT = "eta-latency-table/1"
# what must match for an entry to be reused, besides the version of the backend's own software
PROVENANCE_KEYS = ("backend", "target", "device", "schedule")


def _versions() -> dict:
    """The version of every backend's software (a table is reused only under the same version of its own)."""
    import importlib.metadata as md

    out = {}
    for name in backends.names():
        b = backends.get(name)
        try:
            out[b.version_key] = md.version(b.version_package)
        except md.PackageNotFoundError:
            out[b.version_key] = None
    return out


class Workload(NamedTuple):
    """One thing a table times: a signature naming its structure, a factory of the module, its input, its bits."""

    signature: str
    factory: Callable
    input_shape: tuple
    bits: int = 32


def schedules_database(target: dict) -> Path:
    """The tuned-schedule database of ``target`` in the cache, started from the one shipped with eta if there is one."""
    path = paths.schedules_dir() / target_slug(target)
    if not path.exists():
        ref = paths.reference_dir()
        seed = ref / "schedules" / target_slug(target) if ref is not None and not paths.tables_overridden() else None
        if seed is not None and seed.is_dir():
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            unpack(seed, tmp)
            try:
                tmp.rename(path)  # whole, or not at all: another process may be seeding it too
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("tuned schedules for %s: starting from the %d tasks' schedules shipped with eta", target_slug(target),
                     len(best_records(path)))
    return path


def workload_signature(kind: str, module) -> str:
    """``kind#digest``: the digest hashes the module's structure, not its weights (latency depends on structure)."""
    return f"{kind}#{hashlib.sha1(repr(module).encode()).hexdigest()[:12]}"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60]


def default_table_path(root, backend: str, target: dict, device: str, schedule: str | None = None) -> Path:
    tgt = "-".join(str(target.get(k)) for k in ("kind", "mcpu", "arch") if target.get(k))
    policy = "" if schedule in (None, backends.get(backend).default_schedule) else "-" + _slug(schedule)
    return Path(root) / _slug(tgt) / f"{backend}-{_slug(device)}{policy}.json"


def _provenance_keys(backend: str) -> tuple:
    return PROVENANCE_KEYS + (backends.get(backend).version_key,)


def _value(prov: dict, key: str):
    # tables written before the schedule policy was recorded were all measured with the default one
    if key == "schedule":
        return prov.get(key) or (backends.get(prov["backend"]).default_schedule if prov.get("backend") in backends.names() else None)
    return prov.get(key)


def _same_provenance(old: dict, new: dict) -> bool:
    return all(_value(old, k) == _value(new, k) for k in _provenance_keys(new.get("backend")))


# executor(provenance, module, input shape, bits, database dir, key) -> the entry's measured fields
Executor = Callable[[dict, object, tuple, int, "Path | None", "str | None"], dict]


def _check_entries(path: Path, entries: dict) -> None:
    """Every executable entry holds a measured latency: a positive, finite number of milliseconds."""
    for key, e in entries.items():
        if not isinstance(e, dict):
            raise EtaError(f"latency table {path}: entry {key} is not an object")
        if e.get("executable", True):
            ms = e.get("median_ms")
            if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
                raise EtaError(f"latency table {path}: entry {key} has median_ms {ms!r}, not a measured latency; "
                               "remove the entry (or the file) to measure it again")


class LatencyTable:
    """Measured milliseconds per (operator signature, input shape, bit-width) on one target."""

    def __init__(self, path: Path, provenance: dict, entries: dict, stale: list, calibrations: dict | None = None,
                 passes: int = 1):
        self.path = Path(path)
        self.passes = passes  # 2: every entry is timed twice, in separate passes, and the faster kept
        self.provenance = provenance
        self.entries = entries
        self.stale = stale
        self.calibrations = calibrations or {}
        self.summary: dict = {}  # what the last measure_many cost (entries, compiled, compile_s, timing_s, wall_s)
        self._built_before_tuning: dict[str, float] = {}  # key -> compile seconds of modules ``tuning_tasks`` built before tuning
        self.tuning: dict | None = None  # what tuning for the table did, when its policy tunes

    @classmethod
    def open(cls, path, *, backend: str, target: dict, device: str, protocol: Protocol | None = None,
             schedule: str | None = None, passes: int = 1) -> "LatencyTable":
        prov = {"backend": backend, "target": target, "device": device, "schedule": schedule or backends.get(backend).default_schedule,
                **_versions(), "created": time.strftime("%Y-%m-%d"), "protocol": (protocol or Protocol()).to_dict()}
        path = Path(path)
        entries, stale, calibrations = {}, [], {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise EtaError(f"corrupt latency table {path}: {err.msg} at line {err.lineno}") from None
            if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
                raise EtaError(f"latency table {path}: not an eta latency table (expected an object with 'entries')")
            old = data.get("provenance", {})
            stale = data.get("stale", [])
            if _same_provenance(old, prov):
                entries = data.get("entries", {})
                _check_entries(path, entries)
                calibrations = data.get("calibrations", {})
                prov["created"] = old.get("created", prov["created"])
            else:
                changed = [k for k in _provenance_keys(backend) if _value(old, k) != prov[k]]
                log.warning("latency table %s was measured with another %s: its entries are not reused", path, "/".join(changed))
                stale = stale + [{"provenance": old, "entries": data.get("entries", {})}]
        return cls(path, prov, entries, stale, calibrations, passes)

    @property
    def database_dir(self) -> Path | None:
        """MetaSchedule's database of a tuned table: one per target, shared by every space (``<table>-db/`` beside
        tables of earlier eta, which tuned per entry); None when untuned."""
        schedule = _value(self.provenance, "schedule")
        if not uses_schedules(schedule):
            return None
        if schedule.startswith("metaschedule:"):
            return self.path.with_name(self.path.stem + "-db")
        return schedules_database(self.provenance["target"])

    @staticmethod
    def key(signature: str, input_shape: tuple, bits: int = 32) -> str:
        return f"{signature}|{'x'.join(str(int(d)) for d in input_shape)}|w{bits}"

    def get(self, signature: str, input_shape: tuple, bits: int = 32) -> float | None:
        e = self.entries.get(self.key(signature, input_shape, bits))
        if e is None or not e.get("executable", True):
            return None
        return float(e["median_ms"])

    def entry(self, signature: str, input_shape: tuple, bits: int = 32) -> dict | None:
        return self.entries.get(self.key(signature, input_shape, bits))

    def save(self) -> None:
        """Write atomically under the file's lock, first taking in what other processes added meanwhile.

        Several searches share one table: each re-reads the file under the lock and merges before
        writing, so no writer loses another's entries (its own entries win for the keys it measured).
        """
        with file_lock(self.path):
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if _same_provenance(data.get("provenance", {}), self.provenance):
                for key, entry in data.get("entries", {}).items():
                    self.entries.setdefault(key, entry)
                for key, cal in data.get("calibrations", {}).items():
                    self.calibrations.setdefault(key, cal)
            write_json(self.path, {"format": FORMAT, "provenance": self.provenance, "entries": self.entries,
                                   "calibrations": self.calibrations, "stale": self.stale})

    def set_calibration(self, space_key: str, calibration: dict) -> None:
        self.calibrations[space_key] = calibration
        self.save()

    def check_drift(self, items: list[tuple[str, Callable, tuple, int]], executor: Executor | None = None, *,
                    sample: int = 3, tolerance: float = 0.10, confirmations: int = 3, pause_s: float = 3.0) -> float | None:
        """Re-measure a few cached entries; if this machine disagrees with them, start the table afresh.

        A target name (``AMD EPYC``, ``llvm -mcpu=znver5``) does not pin down a machine's speed:
        another cloud instance of the same CPU measured the same operators 15-25 % slower here.
        Mixing its entries with new ones would make sums of the table wrong in ways calibration
        cannot undo, so when the median ratio of ``sample`` re-measured entries (the oldest among the
        slower half, whose timing is steadiest) stays off by more than ``tolerance`` through
        ``confirmations`` more rounds ``pause_s`` apart (each entry's fastest timing counts: load only
        adds time), every entry moves to ``stale`` and is measured again on this machine. Returns
        the ratio (None when nothing was cached).
        """
        cached = [it for it in items if self.get(it[0], it[2], it[3]) is not None]
        if not cached:
            return None
        # the oldest of the slower half: timing is steadiest on longer entries, and old ones are where another machine shows
        ms = {id(it): self.get(it[0], it[2], it[3]) for it in cached}
        cut = statistics.median(ms.values())
        cached = sorted((it for it in cached if ms[id(it)] >= cut), key=lambda it: self.entry(it[0], it[2], it[3]).get("measured_at", ""))
        executor = executor or measure_entry

        def ratio_now(previous=None):
            out = []
            for i, (signature, factory, shape, bits) in enumerate(cached[:sample]):
                again = executor(self.provenance, factory(), tuple(shape), bits, self.database_dir, self.key(signature, shape, bits))
                if again.get("executable", False):
                    r = again["median_ms"] / self.get(signature, shape, bits)
                    out.append(min(r, previous[i]) if previous else r)  # of two timings the faster (load only adds)
            return out

        ratios = ratio_now()
        if not ratios:
            return None
        for _ in range(confirmations):  # confirm, spaced in time, before discarding the table: a burst of load must not do it
            if abs(statistics.median(ratios) - 1.0) <= tolerance or len(ratios) != min(sample, len(cached)):
                break
            time.sleep(pause_s)
            ratios = ratio_now(ratios)
        ratio = float(statistics.median(ratios))
        if abs(ratio - 1.0) > tolerance:
            log.warning("latency table %s: this machine measures its entries %.0f %% %s than when they were measured "
                        "(another instance, clock or load); its %d entries move to 'stale' and are measured again here",
                        self.path, 100 * abs(ratio - 1), "slower" if ratio > 1 else "faster", len(self.entries))
            self.stale = self.stale + [{"provenance": {**self.provenance, "drift_ratio": ratio, "retired_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                        "entries": self.entries, "calibrations": self.calibrations}]
            self.entries, self.calibrations = {}, {}
            with file_lock(self.path):
                write_json(self.path, {"format": FORMAT, "provenance": self.provenance, "entries": {}, "calibrations": {}, "stale": self.stale})
        else:
            log.info("latency table %s: %d cached entries re-measured within %.1f %% (ratio %.3f)", self.path, len(ratios),
                     100 * abs(ratio - 1), ratio)
        return ratio

    def measure_again(self, items: list[tuple[str, Callable, tuple, int]], executor: Executor | None = None,
                      desc: str = "latency, second timing", progress: bool = False) -> None:
        """Time cached entries once more and keep the faster measurement of each.

        Interference from other processes only ever adds time, so of two honest measurements the
        faster is the closer to the machine's own latency; the slower is kept in the entry's record.
        A burst of load lasts longer than one entry's repeats (seen here: an int8 operator timed at
        1.57 ms in one pass and 1.01 ms in another), so the repeats' median alone does not remove it.
        """
        from tqdm.auto import tqdm

        executor = executor or measure_entry
        for signature, factory, shape, bits in tqdm(items, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            key, old = self.key(signature, shape, bits), self.entry(signature, shape, bits)
            again = executor(self.provenance, factory(), tuple(shape), bits, self.database_dir, key)
            if not (old and again.get("executable") and old.get("executable", True)):
                continue
            slower = max(old["median_ms"], again["median_ms"])
            if again["median_ms"] < old["median_ms"]:
                self.entries[key] = {**old, **again, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.entries[key]["slower_measurement_ms"] = slower
            log.debug("%s %s: timed twice, %.3f ms and %.3f ms; keeping %.3f ms", signature, tuple(shape), old["median_ms"],
                      again["median_ms"], self.entries[key]["median_ms"])
            self.save()

    def time_now(self, items: list[tuple[str, Callable, tuple, int]], executor: Executor | None = None, *,
                 rounds: int = 2) -> list[float | None]:
        """Time ``items`` afresh, side by side, without changing the table: each the faster of ``rounds`` sweeps.

        Entries measured at different times carry the machine's drift between those times; networks
        compared against each other are best timed within one sweep. Each is compiled once (the
        compiled-module cache), and items with one key (the same network reached by two methods) are
        timed once and share the figure, as they share the compiled code; None for an item the
        backend cannot run.
        """
        executor = executor or measure_entry
        keys = [self.key(signature, shape, bits) for signature, _, shape, bits in items]
        first = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        best: dict[str, float] = {}
        for _ in range(rounds):
            for key, i in first.items():
                signature, factory, shape, bits = items[i]
                m = executor(self.provenance, factory(), tuple(shape), bits, self.database_dir, key)
                if m.get("executable", False):
                    best[key] = min(best.get(key, m["median_ms"]), m["median_ms"])
        return [best.get(key) for key in keys]

    def measure_many(self, items: list[tuple[str, Callable, tuple, int]], desc: str = "latency", progress: bool = True,
                     executor: Executor | None = None) -> dict:
        """Measure every item not yet in the table; the file is saved after each entry (resumable).

        Every module to time is compiled first (the backend's ``precompile``: TVM fills its compiled-module
        cache in a process pool), and only then are entries timed, one at a time, each from the cache, so
        compiling never runs beside a timing and the second pass compiles nothing. ``executor`` runs one
        measurement (default: here, with ``measure_entry``; a Ray task on the measuring node otherwise,
        which compiles there). ``summary`` says what it cost.
        """
        from tqdm.auto import tqdm

        local = executor is None or executor is measure_entry
        executor = executor or measure_entry
        t0 = time.perf_counter()
        records = Path(self.database_dir) / RECORDS if self.database_dir is not None else None
        records_mtime = records.stat().st_mtime if records is not None and records.exists() else None
        retuned = [it for it in items if self._schedules_changed(it, records_mtime)]
        if retuned:
            log.info("%s: %d cached entries ran schedules that were tuned further since: measured again", desc, len(retuned))
        todo = [it for it in items if self.key(it[0], it[2], it[3]) not in self.entries or it in retuned]
        todo = list({self.key(it[0], it[2], it[3]): it for it in todo}.values())  # the same workload listed twice
        second = [it for it in items if self.passes > 1 and it not in todo and self._once(it)]
        summary = {"entries": len(items), "measured": len(todo), "cached": len(items) - len(todo), "compiled": 0, "compile_s": 0.0,
                   "timing_s": 0.0}
        if todo:
            log.info("%s: measuring %d of %d entries (%d cached)", desc, len(todo), len(items), len(items) - len(todo))
        if local and (todo or second):
            summary.update(self._precompile(todo + second, progress))
        ahead = [self._built_before_tuning.pop(k) for k in {self.key(it[0], it[2], it[3]) for it in todo} if k in self._built_before_tuning]
        summary["compiled"] += len(ahead)  # built before tuning, for these entries
        summary["compile_s"] += sum(ahead)
        for signature, factory, shape, bits in tqdm(todo, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            key = self.key(signature, shape, bits)
            base = {"signature": signature, "input_shape": list(shape), "bits": bits, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.entries[key] = {**base, **executor(self.provenance, factory(), tuple(shape), bits, self.database_dir, key)}
            summary["timing_s"] += float(self.entries[key].get("timing_s", 0.0))
            self.save()
        if self.passes > 1:  # a second pass, after the first, so one burst of load does not hit both timings of an entry
            once = list({self.key(it[0], it[2], it[3]): it for it in items if self._once(it)}.values())
            if once:
                log.info("%s: timing %d entries a second time (the faster is kept)", desc, len(once))
                self.measure_again(once, executor, desc=f"{desc}, second timing", progress=progress)
        summary["wall_s"] = time.perf_counter() - t0
        self.summary = summary
        if todo:
            log.info("%s: %d entries (%d measured, %d cached): %d modules compiled in %.1f s, %.1f s of timing, %.1f s in all",
                     desc, summary["entries"], summary["measured"], summary["cached"], summary["compiled"], summary["compile_s"],
                     summary["timing_s"], summary["wall_s"])
        return {self.key(s, sh, b): self.get(s, sh, b) for s, _, sh, b in items}

    def _schedules_changed(self, item, records_mtime: float | None) -> bool:
        """Whether a cached tuned entry ran other schedules than the database now holds for its workloads (tuning
        went on since): its figure is measured again, so the table never mixes old and new schedules."""
        database = self.database_dir
        e = self.entry(item[0], item[2], item[3])
        if database is None or not e or not e.get("executable", True) or e.get("schedules") is None:
            return False
        measured = e.get("measured_at")
        if measured and records_mtime is not None and records_mtime < time.mktime(time.strptime(measured, "%Y-%m-%dT%H:%M:%S")):
            return False  # no record added since the entry was timed (building the module for its digest costs more)
        from .compile_cache import schedule_digest_of

        key = self.key(item[0], item[2], item[3])
        return schedule_digest_of(item[1](), tuple(item[2]), self.provenance["target"], key, database) != e["schedules"]

    def _once(self, item) -> bool:
        """Whether an entry was timed once only (its second timing is owed)."""
        e = self.entry(item[0], item[2], item[3])
        return bool(e) and e.get("executable", True) and "slower_measurement_ms" not in e

    def tuning_tasks(self, items, progress: bool = True, retuning: frozenset = frozenset()) -> list:
        """Each item's tuning tasks (None where the backend does not say), found by compiling the items first.

        An item whose every task has a tuned schedule is compiled there and then (its timing later loads
        it); the others are left until tuning has given them schedules. So a space whose schedules are
        all tuned or shipped is imported and compiled once, not once more to look for tasks to tune.
        ``retuning``: tasks the tuning run will tune further (a resumed run); items using one wait too.
        """
        done = self._precompile(items, progress, tuned_only=True, retuning=retuning)
        self._built_before_tuning.update(done.get("built", {}))  # counted by the measure_many that times them
        tasks = done.get("tasks", {})
        return [tasks.get(self.key(signature, shape, bits)) for signature, _, shape, bits in items]

    def compile_ahead(self, items, workers: int | None = None, retuning: frozenset = frozenset()) -> int:
        """Start compiling ``items``, ``workers`` at a time (default: one per core), and return at once (a no-op for
        backends that compile nothing); their timing later takes the compiled modules, and waits for the compiles
        to end. Items with a task not tuned yet, or in ``retuning``, are left for after tuning. Returns how many
        were started."""
        backend = backends.get(self.provenance["backend"])
        if backend.compile_ahead is None:
            return 0
        return backend.compile_ahead(self.provenance, self._jobs(items), self.database_dir, workers, retuning)

    def _jobs(self, items) -> list[tuple]:
        """(key, module, input shape) of each item the backend can run."""
        backend = backends.get(self.provenance["backend"])
        jobs = []
        for signature, factory, shape, bits in items:
            module = factory()
            try:
                backends.measurer(backend.name, module, bits)
            except backends.NotExecutable:  # recorded as such when it is timed
                continue
            jobs.append((self.key(signature, shape, bits), module, tuple(shape)))
        return jobs

    def _precompile(self, items, progress: bool, tuned_only: bool = False, retuning: frozenset = frozenset()) -> dict:
        """Compile the modules of ``items`` (float and integer) before any is timed (a no-op for backends that compile nothing)."""
        backend = backends.get(self.provenance["backend"])
        if backend.precompile is None:
            return {}
        jobs = self._jobs(items)
        if not jobs:
            return {}
        done = backend.precompile(self.provenance, jobs, self.database_dir, progress, tuned_only, retuning)
        for err in done.get("errors", []):
            log.warning("compiling: %s", err)
        return {k: done[k] for k in ("compiled", "compile_s") + (("tasks", "built") if tuned_only else ()) if k in done}
