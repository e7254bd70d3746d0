"""Compile PyTorch modules with TVM (Relax) for a target and time them there.

Path: ``torch.export`` → ``from_exported_program`` → ``tvm.compile`` → Relax VM, timed with TVM's
own ``time_evaluator``. Untuned schedules unless a MetaSchedule database is given; the same
policy must be used for the table and for the students compiled from it.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EtaError
from .protocol import Measurement, Protocol, measure_callable

log = logging.getLogger(__name__)


def host_target(kind: str = "llvm", num_cores: int | None = None) -> dict:
    """The JSON target for this machine's CPU (``llvm``) or its GPU (``cuda``)."""
    import os

    import tvm

    if kind == "llvm":
        return {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": int(num_cores or os.cpu_count() or 1)}
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise EtaError("latency target cuda: no CUDA GPU is visible on this node")
        major, minor = torch.cuda.get_device_capability()
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    raise EtaError(f"latency target '{kind}' is not supported (use llvm or cuda)")


def device_name(target: dict) -> str:
    if target.get("kind") == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_relax(module: torch.nn.Module, input_shape: tuple):
    """The module as a Relax IRModule with its weights as constants (``torch.export`` then TVM's frontend)."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), (torch.randn(*input_shape),))
        return from_exported_program(program, keep_params_as_input=False)
    except Exception as err:  # the frontend raises many types for unsupported operators
        raise EtaError(f"TVM cannot import {type(module).__name__}: {str(err).splitlines()[0]}") from None


def lower_for_tuning(mod):
    """The TIR form MetaSchedule tunes and its database is keyed on (inference ops, bindings, legalised)."""
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                    relax.get_pipeline("zero")])
    return seq(mod)


def apply_database(mod, tvm_target, database_dir):
    """Replace each TIR function by its tuned schedule from a MetaSchedule JSON database (untuned when absent)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    mod = lower_for_tuning(mod)
    with ms.database.JSONDatabase(work_dir=str(database_dir)), tvm_target:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


class CompiledModule:
    """A module compiled for one input shape; ``run`` for outputs, ``time`` for latency."""

    def __init__(self, module: torch.nn.Module, input_shape: tuple, target: dict, database_dir: Path | None = None):
        import tvm

        t0 = time.perf_counter()
        mod = to_relax(module, input_shape)
        tvm_target = tvm.target.Target(target)
        if database_dir is not None:
            mod = apply_database(mod, tvm_target, database_dir)
        # how many TIR functions run a tuned schedule (0: TVM's untuned defaults throughout)
        self.tuned_functions = sum(1 for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                                   and bool(f.attrs.get("tirx.is_scheduled", False)))
        self.executable, self.device, self.vm = load_vm(mod, target)
        self.input_shape = tuple(input_shape)
        self.compile_s = time.perf_counter() - t0
        self._input = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(input_shape).astype("float32"), self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), self.device))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    def time(self, protocol: Protocol | None = None) -> Measurement:
        return time_vm(self.vm, self.device, self._input, protocol, self.compile_s)


def load_vm(mod, target: dict):
    """(executable, device, VM) of a Relax module compiled for ``target``."""
    import tvm
    from tvm import relax

    executable = tvm.compile(mod, target=tvm.target.Target(target))
    device = tvm.cuda() if target.get("kind") == "cuda" else tvm.cpu()
    return executable, device, relax.VirtualMachine(executable, device)


def time_vm(vm, device, tensor_input, protocol: Protocol | None = None, compile_s: float = 0.0) -> Measurement:
    """Latency of the VM's ``main`` on one input by the measurement protocol (float and integer modules alike)."""
    protocol = protocol or Protocol()

    def timer(number, repeat):
        ev = vm.time_evaluator("main", device, number=number, repeat=repeat, min_repeat_ms=0)
        return [r * 1e3 for r in ev(tensor_input).results]

    m = measure_callable(timer, lambda: vm["main"](tensor_input), protocol)
    m.compile_s = compile_s
    return m


def compile_module(module, input_shape, target: dict, database_dir=None) -> CompiledModule:
    return CompiledModule(module, input_shape, target, database_dir)


def measure(module, input_shape, target: dict, protocol: Protocol | None = None, database_dir=None) -> Measurement:
    return compile_module(module, input_shape, target, database_dir).time(protocol)


# apache-tvm-ffi releases known to crash inside MetaSchedule (tvm::ffi::ToJSONGraph segfault)
CRASHING_FFI_PREFIXES = ("0.1.15",)


def _check_tuning_runtime() -> None:
    import importlib.metadata as md

    try:
        ffi = md.version("apache-tvm-ffi")
    except md.PackageNotFoundError:
        return
    if ffi.startswith(CRASHING_FFI_PREFIXES):
        raise EtaError(f"MetaSchedule tuning crashes with apache-tvm-ffi {ffi}; install apache-tvm-ffi==0.1.14.post1")


def build_candidate(mod, target, _params):
    """MetaSchedule's default candidate build, minus its import of every TVM tensor intrinsic.

    That import costs each builder worker about 20 s of CPU inside the 30 s build timeout, so on a
    busy machine every build timed out. Candidates arrive already scheduled (tensorized blocks
    expanded), so the build itself does not need the intrinsics registered.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def tune(module, input_shape, target: dict, work_dir, trials: int, *, max_workers: int | None = None, seed: int = 0) -> None:
    """Tune each TIR workload of the module with MetaSchedule for ``trials`` trials into ``work_dir``.

    ``work_dir`` holds a JSON database that ``compile_module(database_dir=work_dir)`` applies, so
    a table and the students compiled later share the same schedules. Workloads that already have
    a tuning record there are skipped (MetaSchedule keys them by structural hash), so identical
    layers of different table entries are tuned once.
    """
    import os

    import tvm
    from tvm.s_tir import meta_schedule as ms

    _check_tuning_runtime()
    if trials < 1:
        raise EtaError(f"tuning needs at least one trial per workload, got {trials}")
    tvm_target = tvm.target.Target(target)
    mod = lower_for_tuning(to_relax(module, input_shape))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    t0 = time.perf_counter()
    try:
        with tvm_target:
            tasks = [t for t in ms.relax_integration.extract_tasks(mod, tvm_target)
                     if database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is None]
            if not tasks:
                log.info("tune %s: every workload already has a tuned schedule in %s", type(module).__name__, work_dir)
                return
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir=str(work_dir), seed=seed)
            if not contexts:  # every remaining function was scheduled already (e.g. by a library dispatch)
                return
            builder = ms.builder.LocalBuilder(max_workers=max_workers or int(target.get("num-cores") or os.cpu_count() or 1),
                                              f_build=build_candidate)
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials * len(contexts),
                               max_trials_per_task=trials, num_trials_per_iter=min(64, trials), builder=builder,
                               runner=ms.runner.LocalRunner(), database=database, cost_model="xgb")
    except Exception as err:  # MetaSchedule surfaces TVM and Python errors of many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EtaError(f"MetaSchedule tuning of {type(module).__name__} failed: {reason}") from None
    log.info("tuned %d workloads of %s (%d trials each) in %.0f s", len(contexts), type(module).__name__, trials, time.perf_counter() - t0)
