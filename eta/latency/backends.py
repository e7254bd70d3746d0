"""Latency backends behind one registry: how a module is timed on a target, and by what software.

A backend (``tvm``, ``torch``) names the software a table's numbers come from, reads the target
of the machine it runs on, and times modules. Modules of other kinds register their own
measurer for a backend by class (:func:`register_measurer`): :mod:`eta.quant` registers its
``QuantOp`` and ``QuantStudent`` that way for TVM (and their Relax lowering with
:func:`tvm_backend.register_relax_lowering`, so TVM's own measure compiles, tunes and caches them
like float modules), the latency package never imports the quantizers, and a Ray worker that
receives such a module has imported its measurer with its class.

:func:`measure_entry` is what a table entry runs, here or as a Ray task on the measuring node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import EtaError
from . import torch_backend, tvm_backend
from .protocol import Measurement, Protocol

log = logging.getLogger(__name__)


class NotExecutable(EtaError):
    """The backend cannot run this operator at this bit-width; the table records why."""


# measure(module, input_shape, provenance, database_dir, key) -> (Measurement, extra fields for the entry);
# ``key`` names the workload (the table's key), so a backend may keep what it compiled under it
Measure = Callable[..., "tuple[Measurement, dict]"]
# precompile(provenance, [(key, module, input_shape)], database_dir, progress, tuned_only, retuning)
#   -> {"compiled", "cached", "compile_s", "errors", "tasks": {key: the module's tuning tasks, when known},
#       "built": {key: compile seconds of each module built}}
Precompile = Callable[..., dict]


@dataclass(frozen=True)
class LatencyBackend:
    """One way of running networks: its name, the provenance key of its software version, the schedule
    policy of tables that did not record one, how it describes the local target, how it times a module
    (float ones; on TVM also those with a registered Relax lowering), which policies it offers, and (optionally) how it compiles many modules before any is timed."""

    name: str
    version_package: str
    default_schedule: str
    describe_target: Callable[[str, str], tuple[dict, str]]
    measure_module: Measure
    schedules: Callable[[bool, bool], str]
    precompile: Precompile | None = None
    compile_ahead: Callable | None = None  # (provenance, [(key, module, input_shape)], database_dir, workers, retuning) -> modules started

    @property
    def version_key(self) -> str:
        return f"{self.name}_version"


_BACKENDS: dict[str, LatencyBackend] = {}
_MEASURERS: dict[tuple[str, type], Measure] = {}


def register_backend(backend: LatencyBackend) -> LatencyBackend:
    _BACKENDS[backend.name] = backend
    return backend


def register_measurer(backend: str, module_type: type, measure: Measure) -> None:
    """Time modules of ``module_type`` (and subclasses) with ``measure`` on ``backend``."""
    _MEASURERS[(backend, module_type)] = measure


def get(name: str) -> LatencyBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise EtaError(f"unknown latency backend '{name}' (known: {', '.join(_BACKENDS)})") from None


def names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def measurer(backend: str, module, bits: int) -> Measure:
    """The measurer of this module class on this backend; float modules at 32 bits use the backend's own."""
    for cls in type(module).__mro__:
        if (backend, cls) in _MEASURERS:
            return _MEASURERS[(backend, cls)]
    if bits != 32:
        raise NotExecutable(f"{bits}-bit execution of {type(module).__name__} is not built for backend {backend} "
                            "(integer kernels are TVM's, for quantized operators)")
    return get(backend).measure_module


def schedule_policy(backend: str, tuned: bool = True, torch_compile: bool = False) -> str:
    """What the numbers of a table mean besides the target: ``tuned`` or ``untuned`` (TVM), ``eager`` or
    ``torch.compile`` (PyTorch)."""
    return get(backend).schedules(bool(tuned), bool(torch_compile))


def uses_schedules(schedule: str) -> bool:
    """Whether a policy compiles with tuned schedules (``tuned``; ``metaschedule:N`` in tables of earlier eta)."""
    return schedule == "tuned" or schedule.startswith("metaschedule:")


def measure_entry(provenance: dict, module, input_shape: tuple, bits: int, database_dir: Path | None = None,
                  key: str | None = None) -> dict:
    """Measure one table entry as the table's provenance says (backend, target, schedule, protocol).

    A module-level function so that a Ray task on another node can run it. Returns the entry's
    measured fields; a module the backend cannot run at ``bits`` gives ``{"executable": False, "reason": ...}``.
    """
    try:
        measure = measurer(provenance["backend"], module, bits)
        m, extra = measure(module, tuple(input_shape), provenance, database_dir, key)
    except NotExecutable as err:
        return {"executable": False, "reason": str(err), **_where()}
    return {"executable": True, "median_ms": m.median_ms, "spread": m.spread, "repeats": m.repeats, "samples_ms": m.samples_ms,
            "number": m.number, "compile_s": m.compile_s, "timing_s": m.timing_s, "timed_at": list(m.timed_at), "slowdown": m.slowdown,
            "protocol": provenance["protocol"], **extra, **_where()}


def protocol_of(provenance: dict) -> Protocol:
    return Protocol(**provenance["protocol"])


def _where() -> dict:
    """The Ray node that measured, when a Ray task did (a table says which machine produced each entry)."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return {"ray_node": ray.get_runtime_context().get_node_id()}
    except Exception:  # noqa: BLE001 - provenance only; never fail a measurement over it
        pass
    return {}


# ---------------------------------------------------------------------------------------------
# the built-in backends


def _tvm_target(kind: str, schedule: str) -> tuple[dict, str]:
    # tuned code for a portable CPU (AVX2's x86-64-v3 where the host has it): shipped schedules apply as they are
    target = tvm_backend.host_target(kind, portable=uses_schedules(schedule))
    return target, tvm_backend.device_name(target)


def _tvm_measure(module, input_shape, provenance, database_dir, key=None):
    """Compiled once into the compiled-module cache under the table's key, then timed (tuned: the schedule database applied)."""
    tuned = uses_schedules(provenance["schedule"])
    m = tvm_backend.measure(module, input_shape, provenance["target"], protocol_of(provenance), database_dir if tuned else None, key=key)
    return m, {"cache_hit": m.cache_hit, "schedules": m.schedules}


def _tvm_jobs(provenance, items, database_dir, tuned_only: bool, retuning: frozenset = frozenset()) -> list:
    """Compile jobs of ``(key, module, input_shape)`` items: with the schedule database when the table is tuned."""
    from . import compile_cache

    tuned = uses_schedules(provenance["schedule"])
    db = str(database_dir) if tuned and database_dir is not None else None
    return [compile_cache.CompileJob(key, module, tuple(shape), provenance["target"], db, tuned_only and tuned, frozenset(retuning))
            for key, module, shape in items]


def _tvm_precompile(provenance, items, database_dir, progress=False, tuned_only=False, retuning=frozenset()) -> dict:
    """Compile every module not in the compiled-module cache, in a process pool, before anything is timed.

    ``tuned_only``: build only the modules whose every task has a tuned schedule; the others are left
    for after tuning (``tasks`` then says which tasks each module has), as are those using a task of ``retuning``.
    """
    from . import compile_cache

    results = compile_cache.compile_many(_tvm_jobs(provenance, items, database_dir, tuned_only, retuning), progress=progress,
                                         desc="compiling")
    built = [r for r in results if not r.hit and r.error is None and not r.untuned]
    return {"compiled": len(built), "cached": sum(r.hit for r in results), "compile_s": sum(r.compile_s for r in built),
            "errors": [r.error for r in results if r.error], "tasks": {r.key: r.tasks for r in results if r.tasks is not None},
            "built": {r.key: r.compile_s for r in built}}


def _tvm_compile_ahead(provenance, items, database_dir, workers=None, retuning=frozenset()) -> int:
    """Start compiling ``items`` in the compile pool and return (see ``compile_cache.compile_ahead``)."""
    from . import compile_cache

    return compile_cache.compile_ahead(_tvm_jobs(provenance, items, database_dir, True, retuning), workers)


def _torch_target(kind: str, schedule: str) -> tuple[dict, str]:
    dev = "cuda" if kind == "cuda" else "cpu"
    return {"kind": dev}, torch_backend.device_name(dev)


def _torch_measure(module, input_shape, provenance, database_dir, key=None):
    m = torch_backend.measure(module, input_shape, device=provenance["target"].get("kind", "cpu"), protocol=protocol_of(provenance),
                              compile=provenance["schedule"] == "torch.compile")
    return m, {}


register_backend(LatencyBackend(
    "tvm", "apache-tvm", "untuned", _tvm_target, _tvm_measure,
    lambda tuned, _compile: "tuned" if tuned else "untuned", _tvm_precompile, _tvm_compile_ahead))
register_backend(LatencyBackend(
    "torch", "torch", "eager", _torch_target, _torch_measure,
    lambda _tuned, compile_: "torch.compile" if compile_ else "eager"))

