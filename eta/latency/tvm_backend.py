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
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        t0 = time.perf_counter()
        x = torch.randn(*input_shape)
        try:
            with torch.no_grad():
                program = torch.export.export(module.eval(), (x,))
            mod = from_exported_program(program, keep_params_as_input=False)
        except Exception as err:  # the frontend raises many types for unsupported operators
            raise EtaError(f"TVM cannot import {type(module).__name__}: {str(err).splitlines()[0]}") from None
        tvm_target = tvm.target.Target(target)
        if database_dir is not None:
            mod = apply_database(mod, tvm_target, database_dir)
        self.executable = tvm.compile(mod, target=tvm_target)
        self.device = tvm.cuda() if target.get("kind") == "cuda" else tvm.cpu()
        self.vm = relax.VirtualMachine(self.executable, self.device)
        self.input_shape = tuple(input_shape)
        self.compile_s = time.perf_counter() - t0
        self._input = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(input_shape).astype("float32"), self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), self.device))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    def time(self, protocol: Protocol | None = None) -> Measurement:
        protocol = protocol or Protocol()

        def timer(number, repeat):
            ev = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat, min_repeat_ms=0)
            return [r * 1e3 for r in ev(self._input).results]

        m = measure_callable(timer, lambda: self.vm["main"](self._input), protocol)
        m.compile_s = self.compile_s
        return m


def compile_module(module, input_shape, target: dict, database_dir=None) -> CompiledModule:
    return CompiledModule(module, input_shape, target, database_dir)


def measure(module, input_shape, target: dict, protocol: Protocol | None = None, database_dir=None) -> Measurement:
    return compile_module(module, input_shape, target, database_dir).time(protocol)
