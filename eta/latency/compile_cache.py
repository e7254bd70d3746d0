"""Compile once: every compiled float module is kept as a shared library in the cache, and re-loaded.

Compilation is most of what measuring costs (96 % of a first table pass on a 2-core machine), and
latency depends on a module's structure and shapes, not its weights. So a compiled module is
stored under ``<cache>/compiled/<target slug>/<digest>.so`` with a JSON sidecar, the digest taken
over the caller's workload key (weight-independent, e.g. the table's ``signature|shape|bits``), the
input shape, the target JSON, the TVM version and the digest of the schedules applied (None when
untuned; for a tuned module the best record of each of its workloads, see
``schedules.schedule_digest``). The second timing pass, later runs and calibration load it in a
few milliseconds instead of compiling again.

An entry holds the weights of the module that filled it: reuse it for latency, not for outputs of
another module with the same key (``export.export_library`` keys on the weights too).

``compile_many`` fills the misses of many jobs in a process pool (one per process, reused) while
nothing is timed; the caller then times each job alone, loading it from here. ``compile_ahead``
starts such a round and returns, for modules known before other work (training) ends; a timing
waits until it is done. A tuned job records its module's MetaSchedule tasks here too
(``module_tasks``), so whether its schedules are all tuned is known without importing it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..errors import EtaError
from . import schedules
from .tvm_backend import CompiledModule

log = logging.getLogger(__name__)

FORMAT = "eta-compiled/1"


@dataclass
class CompileJob:
    """One module to compile: ``key`` names its workload (structure, shape, bits; never its weights)."""

    key: str
    module: object  # torch.nn.Module (pickled to a pool worker)
    input_shape: tuple
    target: dict
    database_dir: str | None = None
    tuned_only: bool = False  # build only when the database has a schedule for every task (else report them, build nothing)
    retuning: frozenset = frozenset()  # ``tuned_only``: tasks tuning is about to tune further, as good as unscheduled


@dataclass
class CompileResult:
    """Where a job's library is. ``compile_s``: what building it cost (when it was built, on a hit)."""

    key: str
    path: Path | None
    compile_s: float
    hit: bool
    error: str | None = None
    tasks: list | None = None  # a tuned job's MetaSchedule tasks (``module_tasks``), when known
    untuned: bool = False  # ``tuned_only`` and a task had no schedule: nothing was built


def _shape(input_shape) -> list[int]:
    return [int(d) for d in input_shape]


def _root(target: dict) -> Path:
    from ..paths import cache_subdir

    path = cache_subdir("compiled") / schedules.target_slug(target)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _identity(key: str, input_shape, target: dict, schedule_digest: str | None) -> dict:
    return {"key": key, "input_shape": _shape(input_shape), "target": schedules.canonical_target(target),
            "tvm_version": schedules.tvm_version(), "schedules": schedule_digest}


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps([FORMAT, identity], sort_keys=True).encode()).hexdigest()[:24]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _workloads_path(key: str, input_shape, target: dict) -> Path:
    return _root(target) / "workloads" / f"{_digest(_identity(key, input_shape, target, 'workloads'))}.json"


@dataclass(frozen=True)
class ModuleTask:
    """One MetaSchedule task of a module: its workload's structural hash, name and weight (how often it runs).

    ``scheduled``: the workload comes scheduled already (a library dispatch), so there is nothing to tune.
    """

    hash: str
    name: str
    weight: int
    scheduled: bool = False


def _stored_tasks(key: str, input_shape, target: dict) -> list[ModuleTask] | None:
    try:
        return [ModuleTask(str(h), str(n), int(w), bool(s)) for h, n, w, s in json.loads(_workloads_path(key, input_shape, target).read_text())["tasks"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # absent, damaged, or written before tasks were kept: found again


def module_tasks(module, input_shape, target: dict, key: str, relax_mod=None) -> list[ModuleTask]:
    """A module's MetaSchedule tasks, remembered per key (they depend on structure only), so that finding whether a
    module's schedules are all tuned, and which, costs no import after the first time."""
    found = _stored_tasks(key, input_shape, target)
    if found is not None:
        return found
    import tvm

    from .tvm_backend import extract_tasks, lower_for_tuning, to_relax, workload_hash

    mod = relax_mod if relax_mod is not None else to_relax(module, input_shape)
    tasks = [ModuleTask(workload_hash(t), str(t.task_name), int(t.weight), bool(t.mod.attrs is not None and t.mod.attrs.get("tirx.is_scheduled", False)))
             for t in extract_tasks(lower_for_tuning(mod), tvm.target.Target(target))]
    from ..files import atomic_path

    with atomic_path(_workloads_path(key, input_shape, target)) as tmp:
        tmp.write_text(json.dumps({"key": key, "input_shape": _shape(input_shape), "workloads": sorted({t.hash for t in tasks}),
                                   "tasks": [[t.hash, t.name, t.weight, t.scheduled] for t in tasks]}))
    return tasks


def module_workloads(module, input_shape, target: dict, key: str, relax_mod=None) -> list[str]:
    """The structural hashes of a module's TIR workloads (sorted, each once)."""
    return sorted({t.hash for t in module_tasks(module, input_shape, target, key, relax_mod)})


def untuned_tasks(tasks: list[ModuleTask], database_dir, retuning: Collection[str] = ()) -> list[ModuleTask]:
    """The tasks that need a schedule and have none in the database, or whose schedule tuning is about to change
    (``retuning``): a module built on it now would be built again after tuning."""
    tuned = schedules.tuned_hashes(database_dir)
    return [t for t in tasks if t.hash in retuning or (not t.scheduled and t.hash not in tuned)]


def schedule_digest_of(module, input_shape, target: dict, key: str, database_dir, relax_mod=None) -> str | None:
    """None when untuned; else the digest of the schedules the module's workloads would be compiled with."""
    if database_dir is None:
        return None
    return schedules.schedule_digest(database_dir, module_workloads(module, input_shape, target, key, relax_mod))


def entry_path(key: str, input_shape, target: dict, schedule_digest: str | None = None) -> Path:
    """Where the library of this (workload, shape, target, TVM, schedules) lives; its sidecar is ``.json`` beside it."""
    return _root(target) / f"{_digest(_identity(key, input_shape, target, schedule_digest))}.so"


def record_path(path: Path) -> Path:
    """The JSON record beside a cached library: what it was compiled from, with which schedules, in how long."""
    return path.with_suffix(".json")


def _valid(path: Path, identity: dict) -> dict | None:
    """The sidecar of a complete, intact entry for ``identity``; None when absent or damaged (then removed)."""
    side = record_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
        ok = meta.get("format") == FORMAT and all(meta.get(k) == v for k, v in identity.items())
        ok = ok and path.is_file() and path.stat().st_size == meta["so_bytes"] and _file_sha(path) == meta["so_sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("compiled-module cache entry %s is damaged or stale; rebuilding it", path)
        _remove(path)
        return None
    return meta


def _remove(path: Path) -> None:
    for p in (record_path(path), path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _store(executable, path: Path, identity: dict, compile_s: float, tuned_functions: int, database_dir,
           dtype: str = "float32") -> dict:
    """Export the library beside its final name, then rename it and its sidecar into place."""
    from ..files import atomic_path

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.so")  # ends in .so: export_library links a shared object
    try:
        executable.export_library(str(tmp))
        size, sha = tmp.stat().st_size, _file_sha(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"format": FORMAT, **identity, "database_dir": None if database_dir is None else str(database_dir),
            "compile_s": round(float(compile_s), 4), "tuned_functions": int(tuned_functions), "input_dtype": dtype, "so_bytes": size,
            "so_sha256": sha, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(record_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _build(module, input_shape, target: dict, key: str, database_dir, relax_mod=None, import_s: float = 0.0) -> tuple[Path, dict]:
    """Compile and store one entry (after a miss); returns its path and sidecar (``import_s``: import time spent before)."""
    from .tvm_backend import build_executable, input_dtype, to_relax

    t0 = time.perf_counter() - import_s
    relax_mod = relax_mod if relax_mod is not None else to_relax(module, input_shape)
    digest = schedule_digest_of(module, input_shape, target, key, database_dir, relax_mod)
    executable, tuned = build_executable(module, input_shape, target, None if database_dir is None else Path(database_dir), relax_mod)
    compile_s = time.perf_counter() - t0
    path = entry_path(key, input_shape, target, digest)
    meta = _store(executable, path, _identity(key, input_shape, target, digest), compile_s, tuned, database_dir,
                  input_dtype(relax_mod))
    log.debug("compiled %s %s in %.2f s -> %s", key, tuple(input_shape), compile_s, path.name)
    return path, meta


def lookup(key: str, input_shape, target: dict, database_dir=None, module=None, relax_mod=None) -> tuple[Path, dict] | None:
    """(path, sidecar) of an intact cache entry, or None.

    For a tuned job the workloads of the module must be known (remembered from an earlier compile,
    or found from ``module``); without either the answer is None.
    """
    if database_dir is not None and module is None and _stored_tasks(key, input_shape, target) is None:
        return None
    digest = schedule_digest_of(module, input_shape, target, key, database_dir, relax_mod)
    path = entry_path(key, input_shape, target, digest)
    meta = _valid(path, _identity(key, input_shape, target, digest))
    return (path, meta) if meta else None


def _load(path: Path, meta: dict, input_shape, target: dict, hit: bool) -> CompiledModule:
    import tvm

    t0 = time.perf_counter()
    executable = tvm.runtime.load_module(str(path))
    compiled = CompiledModule.from_executable(executable, input_shape, target, compile_s=meta["compile_s"],
                                              tuned_functions=meta.get("tuned_functions", 0), cache_hit=hit, path=path,
                                              load_s=time.perf_counter() - t0, dtype=meta.get("input_dtype", "float32"))
    compiled.schedules = meta.get("schedules")  # the digest of the schedules applied (None: untuned)
    return compiled


def _import_if_needed(module, input_shape, target: dict, key: str, database_dir):
    """(Relax module, seconds) when a tuned lookup needs the module's workloads first; (None, 0) otherwise.

    The import is then reused by the compile of a miss instead of being done twice.
    """
    if database_dir is None or _stored_tasks(key, input_shape, target) is not None:
        return None, 0.0
    from .tvm_backend import to_relax

    t0 = time.perf_counter()
    return to_relax(module, input_shape), time.perf_counter() - t0


def compiled_module(module, input_shape, target: dict, *, key: str, database_dir=None) -> CompiledModule:
    """The module compiled for ``target`` at ``input_shape``: loaded from the cache, or compiled and stored there.

    ``key`` names the workload and must not depend on weights (the table's ``signature|shape|bits``).
    An entry that does not load is rebuilt, with one warning.
    """
    input_shape = tuple(int(d) for d in input_shape)
    wait_for_compiles()  # what this returns is about to be timed
    relax_mod, import_s = _import_if_needed(module, input_shape, target, key, database_dir)
    found = lookup(key, input_shape, target, database_dir, module, relax_mod)
    if found is not None:
        try:
            return _load(*found, input_shape, target, hit=True)
        except Exception as err:  # noqa: BLE001 - a library that no longer loads (other TVM build, damaged file)
            log.warning("compiled-module cache entry %s does not load (%s); rebuilding it", found[0],
                        (str(err).strip().splitlines() or [type(err).__name__])[-1][:120])
            _remove(found[0])
    path, meta = _build(module, input_shape, target, key, database_dir, relax_mod, import_s)
    return _load(path, meta, input_shape, target, hit=False)


def _ensure(job: CompileJob) -> CompileResult:
    """A pool worker's job: make sure the entry exists (no VM is created, nothing is timed)."""
    try:
        relax_mod, import_s = _import_if_needed(job.module, job.input_shape, job.target, job.key, job.database_dir)
        tasks = None
        if job.database_dir is not None:
            tasks = module_tasks(job.module, job.input_shape, job.target, job.key, relax_mod)
            if job.tuned_only and untuned_tasks(tasks, job.database_dir, job.retuning):
                return CompileResult(job.key, None, 0.0, False, tasks=tasks, untuned=True)
        found = lookup(job.key, job.input_shape, job.target, job.database_dir, job.module, relax_mod)
        if found is not None:
            return CompileResult(job.key, found[0], float(found[1]["compile_s"]), True, tasks=tasks)
        path, meta = _build(job.module, job.input_shape, job.target, job.key, job.database_dir, relax_mod, import_s)
        return CompileResult(job.key, path, float(meta["compile_s"]), False, tasks=tasks)
    except EtaError as err:
        return CompileResult(job.key, None, 0.0, False, str(err))


def _ensure_pickled(job: bytes) -> CompileResult:
    return _ensure(pickle.loads(job))


PARENT_POLL_S = 0.5  # how often a compile worker checks that the process it compiles for still runs


def _exit_with_parent(parent: int) -> None:
    """End this worker once ``parent`` is gone, even in the middle of a compile.

    A driver killed outright (SIGKILL, the OOM killer, a lost SSH session) cannot shut its pool down,
    and its workers would go on through every job already queued (minutes for large networks) on a
    machine others share. A daemon thread polls the parent id: on Linux and macOS an orphan is
    re-parented, so a changed ``getppid`` means the driver died.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="eta-compile-parent-watch", daemon=True).start()


def _worker_init(parent: int) -> None:
    """One compile per core: torch.export single-threaded; a first tiny compile pays TVM's and torch's
    one-time start-up (about 5 s here) before any job, so each job's ``compile_s`` is its own. The
    worker ends with ``parent``, the process that started the pool."""
    _exit_with_parent(parent)
    import torch

    from .tvm_backend import to_relax

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    try:
        import tvm

        tvm.compile(to_relax(torch.nn.Linear(2, 2), (1, 2)), target=tvm.target.Target({"kind": "llvm"}))
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


_POOL: dict = {}  # the compile pool this process keeps: {"key": (workers, environment), "pool": executor}


def _pool(workers: int):
    """A pool of ``workers`` spawned compile processes, kept while this process runs.

    Starting one costs each worker TVM's and torch's import, a warm-up compile and the parse of the
    schedule database (seconds each); a search compiles in several rounds (table, calibration, the
    front), so the workers are reused. A changed environment (another cache directory) gets new ones.
    """
    import atexit
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    key = (workers, tuple(sorted(os.environ.items())))
    if _POOL.get("key") != key:
        shutdown_pool()
        _POOL.update(key=key, pool=ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                                         initargs=(os.getpid(),)))
        if not _POOL.get("atexit"):
            atexit.register(shutdown_pool)
            _POOL["atexit"] = True
    return _POOL["pool"]


def shutdown_pool() -> None:
    """Stop the compile pool's workers (a new pool starts at the next ``compile_many``)."""
    pool = _POOL.pop("pool", None)
    _POOL.pop("key", None)
    _POOL.pop("pending", None)
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _ident(job: CompileJob) -> tuple:
    return (job.key, tuple(_shape(job.input_shape)), schedules.target_json(job.target), job.database_dir and str(job.database_dir))


def compile_ahead(jobs: list[CompileJob], workers: int | None = None) -> int:
    """Start compiling the misses among ``jobs`` in the pool and return at once (how many were started).

    For modules known well before they are timed (the table's, while the teacher trains; the front's
    networks, while the students finetune): ``compile_many`` later takes their results, and every
    timing in this process waits until they are done (``wait_for_compiles``), so nothing is timed
    beside a compile. Each job is pickled before this returns, so its module may change (train) after.
    """
    pool = _pool(max(1, int(workers or os.cpu_count() or 1)))
    pending = _POOL.setdefault("pending", {})
    started = 0
    for job in jobs:
        k = _ident(job)
        if k in pending or lookup(job.key, job.input_shape, job.target, job.database_dir) is not None:
            continue
        pending[k] = pool.submit(_ensure_pickled, pickle.dumps(job))  # pickled now: the caller may go on changing the module
        started += 1
    if started:
        log.info("compiling %d modules ahead, while other work runs", started)
    return started


def wait_for_compiles() -> None:
    """Return when no compile started by ``compile_ahead`` runs any more (before anything is timed)."""
    from concurrent.futures import wait

    pending = _POOL.get("pending") or {}
    if any(not f.done() for f in pending.values()):
        log.info("waiting for %d modules compiling ahead", sum(not f.done() for f in pending.values()))
        wait(list(pending.values()))


def compile_many(jobs: list[CompileJob], workers: int | None = None, *, progress: bool = False,
                 desc: str = "compiling") -> list[CompileResult]:
    """Fill the cache for every job (misses compiled ``workers`` at a time in spawned processes); one result per job.

    Jobs with the same (key, shape, target, database) are compiled once. A job TVM cannot compile
    comes back with ``error`` set (its timing will raise the same error); a worker that dies takes
    only its own jobs with it. Call it from a ``if __name__ == "__main__"`` guarded script:
    spawned workers re-import the main module.
    """
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    done: dict[tuple, CompileResult] = {}
    todo: dict[tuple, CompileJob] = {}
    pending = _POOL.get("pending") or {}
    for job in jobs:
        k = _ident(job)
        if k in done or k in todo:
            continue
        if k in pending:  # started by compile_ahead: its result, once it is there
            try:
                result = pending.pop(k).result()
            except Exception:  # noqa: BLE001 - a worker that died or a cancelled future: compiled here instead
                result = None
            if result is not None and (job.tuned_only or not result.untuned):  # else it built nothing, this job must
                done[k] = result
                continue
        found = lookup(job.key, job.input_shape, job.target, job.database_dir)  # cheap: no module import here
        if found is not None:
            tasks = None if job.database_dir is None else _stored_tasks(job.key, job.input_shape, job.target)
            untuned = bool(job.tuned_only and tasks and untuned_tasks(tasks, job.database_dir, job.retuning))
            done[k] = CompileResult(job.key, found[0], float(found[1]["compile_s"]), True, tasks=tasks, untuned=untuned)
        else:
            todo[k] = job
    workers = max(1, int(workers or os.cpu_count() or 1))
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo, dynamic_ncols=True, leave=False)
    if todo:
        log.info("%s: %d of %d modules to compile (%d cached), %d at a time", desc, len(todo), len(done) + len(todo), len(done),
                 min(workers, len(todo)))
    if workers == 1 or len(todo) == 1:
        for k, job in todo.items():
            done[k] = _ensure(job)
            bar.update()
    elif todo:
        futures = {_pool(workers).submit(_ensure, job): k for k, job in todo.items()}
        for fut in as_completed(futures):
            k = futures[fut]
            try:
                done[k] = fut.result()
            except BrokenProcessPool:
                done[k] = CompileResult(todo[k].key, None, 0.0, False, "the compile worker died")
            bar.update()
        if any(r.error == "the compile worker died" for r in done.values()):
            shutdown_pool()  # a broken pool takes no more jobs: the next call starts a new one
    bar.close()
    return [done[_ident(job)] for job in jobs]


def prune(max_age_days: float | None = None) -> int:
    """Remove entries no lookup can hit any more (another TVM version, no sidecar, left-over temporaries), and,
    with ``max_age_days``, entries older than that. Returns how many files went."""
    from ..paths import cache_subdir

    removed, now, version = 0, time.time(), schedules.tvm_version()
    for lib in cache_subdir("compiled").glob("*/*.so"):
        side = record_path(lib)
        try:
            meta = json.loads(side.read_text()) if side.is_file() else None
        except (OSError, json.JSONDecodeError):
            meta = None
        old = max_age_days is not None and now - lib.stat().st_mtime > max_age_days * 86400
        if lib.name.startswith(".") or meta is None or meta.get("tvm_version") != version or old:
            removed += sum(p.exists() for p in (lib, side))
            _remove(lib)
    return removed
