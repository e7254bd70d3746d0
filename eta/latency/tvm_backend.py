"""Compile PyTorch modules with TVM (Relax) for a target and time them there.

Path: ``torch.export`` → ``from_exported_program`` → ``tvm.compile`` → Relax VM, timed with TVM's
own ``time_evaluator``. Untuned schedules unless a MetaSchedule database is given; the same
policy must be used for the table and for the students compiled from it.

Compiling once and re-loading is ``compile_cache``; tuning a whole space under one budget is
``tuning``; the exported library is ``deploy``. This module is what they share.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import EtaError
from .host import cpu_name
from ..locks import timing_device
from .protocol import Measurement, Protocol, measure_callable

log = logging.getLogger(__name__)


PORTABLE_CPU = "x86-64-v3"  # AVX2 and FMA: nearly every x86 server and laptop of the last decade


def host_target(kind: str = "llvm", num_cores: int | None = None, *, portable: bool = False) -> dict:
    """The JSON target for this machine's CPU (``llvm``) or its GPU (``cuda``).

    ``portable``: code for :data:`PORTABLE_CPU` instead of this exact CPU where this CPU runs it, so
    schedules tuned once (and shipped with eta) apply on every such machine; timings are still
    taken here. On this project's AVX-512 machine, tuned x86-64-v3 code ran 4-17 % slower than code
    tuned for the CPU itself.
    """
    import tvm

    if kind == "llvm":
        mcpu = PORTABLE_CPU if portable and _runs_portable_cpu() else str(tvm.target.codegen.llvm_get_system_cpu())
        return {"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores or os.cpu_count() or 1)}
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise EtaError("latency target cuda: no CUDA GPU is visible on this node")
        major, minor = torch.cuda.get_device_capability()
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    raise EtaError(f"latency target '{kind}' is not supported (use llvm or cuda)")


def _runs_portable_cpu() -> bool:
    """Whether this is an x86-64 CPU with AVX2 and FMA (what x86-64-v3 code needs)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "bmi2"} <= set(flags)


def device_name(target: dict) -> str:
    if target.get("kind") == "cuda":
        return torch.cuda.get_device_name()
    return cpu_name()


# module type -> lower(module, input_shape) -> Relax IRModule, for modules torch.export cannot express (integer kernels)
_RELAX_LOWERINGS: dict[type, Callable] = {}


def register_relax_lowering(module_type: type, lower: Callable) -> None:
    """Build the Relax form of ``module_type`` (and subclasses) with ``lower(module, input_shape)``.

    Everything that compiles, tunes or caches a module goes through :func:`to_relax`, so a module
    type registered here gets tuned schedules and the compiled-module cache like any float module.
    """
    _RELAX_LOWERINGS[module_type] = lower


def to_relax(module: torch.nn.Module, input_shape: tuple):
    """The module as a Relax IRModule with its weights as constants (``torch.export`` then TVM's frontend,
    or the lowering registered for its type)."""
    for cls in type(module).__mro__:
        if cls in _RELAX_LOWERINGS:
            return _RELAX_LOWERINGS[cls](module, tuple(input_shape))
    return exported_relax(module, input_shape)


def exported_relax(module: torch.nn.Module, input_shape: tuple):
    """The module through ``torch.export`` and TVM's frontend, whatever lowering its type has registered."""
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

    seq = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()])
    return relax.get_pipeline("zero")(fold_constants(seq(mod)))


# Relax operators on constants that ``fold_constants`` evaluates with NumPy (float tensors, NumPy broadcasting).
_NUMPY_OPS = {
    "relax.expand_dims": lambda attrs, a: np.expand_dims(a, tuple(int(x) for x in attrs.axis)),
    "relax.add": lambda attrs, a, b: a + b,
    "relax.subtract": lambda attrs, a, b: a - b,
    "relax.multiply": lambda attrs, a, b: a * b,
    "relax.divide": lambda attrs, a, b: a / b,
    "relax.sqrt": lambda attrs, a: np.sqrt(a),
    "relax.rsqrt": lambda attrs, a: 1 / np.sqrt(a),
}


def fold_constants(mod):
    """Evaluate the inference-time arithmetic on weights (batch norm's ``sqrt(var + eps)`` and the like) in NumPy.

    Relax's ``FoldConstant`` builds and runs a TIR function for each such expression: about 3 s of a
    3.6 s lowering for a small CNN. Folded here first, it finds nothing left; the TIR workloads (and
    so their tuned schedules) are the same.
    """
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Folder(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            fold = _NUMPY_OPS.get(getattr(call.op, "name", None))
            if fold is None or not call.args:
                return call
            args = [self.lookup_binding(a) if isinstance(a, relax.Var) else a for a in call.args]
            if not all(isinstance(a, tvm.ir.expr.Constant) for a in args):
                return call
            values = [a.value.numpy() for a in args]
            if not all(v.dtype.kind == "f" and v.dtype == values[0].dtype for v in values):
                return call
            return relax.const(np.asarray(fold(call.attrs, *values), dtype=values[0].dtype), str(values[0].dtype))

    folder = _Folder(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gv, folder.visit_expr(func))
    return folder.builder_.get()


def apply_database(mod, tvm_target, database_dir):
    """Replace each TIR function by its tuned schedule from a MetaSchedule JSON database (untuned when absent)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    load_tensor_intrinsics(tvm_target.kind.name)  # a record may tensorize with an intrinsic registered there
    mod = lower_for_tuning(mod)
    with opened_database(database_dir), tvm_target:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


_DATABASES: dict[str, tuple] = {}


def opened_database(database_dir):
    """The JSON database at ``database_dir``, parsed once per process while its files stay as they are.

    Parsing it costs seconds (every workload's whole IR); a compile pool's worker compiles many
    modules against one database, so it keeps the parsed one until tuning changes the files.
    """
    from tvm.s_tir import meta_schedule as ms

    from .schedules import files_stamp

    d = Path(database_dir)
    stamp = files_stamp(d)
    cached = _DATABASES.get(str(d))
    if cached is None or cached[0] != stamp:
        try:
            database = ms.database.JSONDatabase(work_dir=str(d))
        except Exception as err:  # noqa: BLE001 - TVM raises its own types, with the detail often "not rendered"
            raise EtaError(f"schedule database {d} does not load ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
                           "a record that does not replay on its workload; move the folder aside to start afresh") from None
        cached = _DATABASES[str(d)] = (stamp, database)
    return cached[1]


def extract_tasks(lowered, tvm_target) -> list:
    """MetaSchedule's tuning tasks of a lowered module (``lower_for_tuning``), one per distinct TIR workload."""
    from tvm.s_tir import meta_schedule as ms

    with tvm_target:
        return list(ms.relax_integration.extract_tasks(lowered, tvm_target))


def workload_hash(task) -> str:
    """The structural hash MetaSchedule's database keys a task's workload on (``database_workload.json``)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _tuned_count(mod) -> int:
    import tvm

    return sum(1 for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and bool(f.attrs.get("tirx.is_scheduled", False)))


def input_dtype(relax_mod) -> str:
    """The dtype ``main`` takes (float32 for imported networks, integer codes for integer kernels)."""
    return str(relax_mod["main"].params[0].ty.dtype)


def build_executable(module: torch.nn.Module, input_shape: tuple, target: dict, database_dir: Path | None = None,
                     relax_mod=None) -> tuple:
    """(Relax executable, number of TIR functions with a tuned schedule) of a module at one input shape.

    ``relax_mod`` skips the import when the caller already has ``to_relax(module, input_shape)``.
    """
    import tvm

    mod = relax_mod if relax_mod is not None else to_relax(module, input_shape)
    tvm_target = tvm.target.Target(target)
    if database_dir is not None:
        mod = apply_database(mod, tvm_target, database_dir)
    # how many TIR functions run a tuned schedule (0: TVM's untuned defaults throughout)
    tuned = _tuned_count(mod)
    try:
        return tvm.compile(mod, target=tvm_target), tuned
    except Exception as err:  # LLVM and TVM raise many types for a target they cannot build
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise EtaError(f"TVM cannot build {type(module).__name__} for target {target}: {reason}") from None


def device_of(target: dict):
    import tvm

    return tvm.cuda() if target.get("kind") == "cuda" else tvm.cpu()


class CompiledModule:
    """A module compiled for one input shape; ``run`` for outputs, ``time`` for latency.

    Built here from the module, or (``from_executable``) around an executable re-loaded from the
    compiled-module cache; ``cache_hit`` says which, ``path`` names the cache entry if any, and
    ``compile_s`` is what compiling it cost (on a hit: when the entry was made).
    """

    cache_hit = False
    path: Path | None = None
    load_s = 0.0
    schedules: str | None = None  # set by the cache: digest of the schedules applied

    def __init__(self, module: torch.nn.Module, input_shape: tuple, target: dict, database_dir: Path | None = None):
        t0 = time.perf_counter()
        mod = to_relax(module, input_shape)
        executable, self.tuned_functions = build_executable(module, input_shape, target, database_dir, relax_mod=mod)
        self._attach(executable, input_shape, target, input_dtype(mod))
        self.compile_s = time.perf_counter() - t0

    @classmethod
    def from_executable(cls, executable, input_shape: tuple, target: dict, *, compile_s: float, tuned_functions: int,
                        cache_hit: bool = False, path: Path | None = None, load_s: float = 0.0,
                        dtype: str = "float32") -> "CompiledModule":
        self = cls.__new__(cls)
        self._attach(executable, input_shape, target, dtype)
        self.compile_s, self.tuned_functions = float(compile_s), int(tuned_functions)
        self.cache_hit, self.path, self.load_s = cache_hit, path, float(load_s)
        return self

    def _attach(self, executable, input_shape, target, dtype: str = "float32") -> None:
        import tvm
        from tvm import relax

        self.executable, self.device = executable, device_of(target)
        self.vm = relax.VirtualMachine(executable, self.device)
        self.input_shape, self.input_dtype = tuple(input_shape), dtype
        rng = np.random.default_rng(0)
        if np.dtype(dtype).kind == "f":
            x = rng.standard_normal(input_shape).astype(dtype)
        else:  # integer codes over the dtype's whole range: integer kernels take no data-dependent branches
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max, size=input_shape, endpoint=True).astype(dtype)
        self._input = tvm.runtime.tensor(x, self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=self.input_dtype), self.device))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    def time(self, protocol: Protocol | None = None) -> Measurement:
        return time_vm(self.vm, self.device, self._input, protocol, self.compile_s)


def load_vm(mod, target: dict):
    """(executable, device, VM) of a Relax module compiled for ``target``."""
    import tvm
    from tvm import relax

    executable = tvm.compile(mod, target=tvm.target.Target(target))
    device = device_of(target)
    return executable, device, relax.VirtualMachine(executable, device)


def time_vm(vm, device, tensor_input, protocol: Protocol | None = None, compile_s: float = 0.0) -> Measurement:
    """Latency of the VM's ``main`` on one input by the measurement protocol (float and integer modules alike)."""
    protocol = protocol or Protocol()

    def timer(number, repeat):
        ev = vm.time_evaluator("main", device, number=number, repeat=repeat, min_repeat_ms=0)
        return [r * 1e3 for r in ev(tensor_input).results]

    m = measure_callable(timer, lambda: vm["main"](tensor_input), protocol, device=timing_device(device))
    m.compile_s = compile_s
    return m


def compile_module(module, input_shape, target: dict, database_dir=None, *, key: str | None = None) -> CompiledModule:
    """Compile the module; with ``key`` (a weight-independent workload key) through the compiled-module cache."""
    if key is not None:
        from .compile_cache import compiled_module

        return compiled_module(module, input_shape, target, key=key, database_dir=database_dir)
    return CompiledModule(module, input_shape, target, database_dir)


def measure(module, input_shape, target: dict, protocol: Protocol | None = None, database_dir=None, *,
            key: str | None = None) -> Measurement:
    """Compile (with ``key``: through the cache) and time; the measurement says whether it was a cache hit."""
    compiled = compile_module(module, input_shape, target, database_dir, key=key)
    m = compiled.time(protocol)
    m.cache_hit, m.schedules = compiled.cache_hit, compiled.schedules
    return m


# apache-tvm-ffi releases known to crash inside MetaSchedule (tvm::ffi::ToJSONGraph segfault)
CRASHING_FFI_PREFIXES = ("0.1.15",)


def check_tuning_runtime() -> None:
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
    layers of different table entries are tuned once. One module's case of
    :func:`eta.latency.tuning.tune_space`, which tunes a whole space under one budget.
    """
    from .tuning import tune_space

    if trials < 1:
        raise EtaError(f"tuning needs at least one trial per workload, got {trials}")
    tune_space([(module, tuple(input_shape))], target, work_dir, trials_per_task=trials, max_workers=max_workers,
               seed=seed, progress=False)


# the intrinsic sets each target kind can tensorize with; importing all of them (CUDA's above all)
# costs about 35 s of CPU on a 2-core machine, and MetaSchedule does it before every tuning run
_INTRINSICS = {"llvm": ("x86", "arm_cpu"), "cuda": ("cuda",), "rocm": ("rocm",), "metal": ("metal",)}


def load_tensor_intrinsics(kind: str) -> None:
    """Register the tensor intrinsics of one target kind only, so MetaSchedule skips its import of them all.

    ``tvm.s_tir.tensor_intrin`` registers every intrinsic set TVM has on import. Standing in for that
    package (submodules stay importable from its path) with only this kind's sets makes the import
    MetaSchedule's TuneContext does free; another kind's sets load when a target of that kind asks.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return
        package = types.ModuleType(name, "TVM tensor intrinsics, registered per target kind by eta")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__package__ = name
        package.__file__ = spec.origin
        sys.modules[name] = package
    for sub in _INTRINSICS.get(kind, ()):
        if kind == "llvm" and sub == "arm_cpu" and not platform.machine().lower().startswith(("arm", "aarch")):
            continue
        try:
            importlib.import_module(f"{name}.{sub}")
        except Exception as err:  # noqa: BLE001 - an intrinsic set that fails to register only loses tensorization
            log.debug("tensor intrinsics %s not registered: %s", sub, err)


# ISA extensions (as LLVM names them) that code compiled for a CPU may use; tuning flags are not among them
_ISA_FEATURE = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vaes|vpclmul|gfni|sha|aes|pclmul|popcnt|lzcnt|movbe|adx|"
                          r"evex512|neon|sve|dotprod|i8mm|bf16|fp16|fullfp16)")


def check_target(target: dict, *, runs_here: bool = True) -> None:
    """Raise a one-line EtaError unless TVM can build for ``target`` (and, with ``runs_here``, this machine can run it).

    TVM accepts any ``mcpu`` and silently compiles for a generic CPU when LLVM does not know it;
    code for a CPU with instructions this one lacks (AVX-512 on an AVX2 machine) builds, then
    crashes when timed.
    """
    import tvm
    from tvm import te

    try:
        tvm_target = tvm.target.Target(target)
    except Exception as err:  # noqa: BLE001 - TVM raises ValueError or TVMError for a bad config
        raise EtaError(f"TVM does not accept target {target}: {str(err).strip().splitlines()[0][:160]}") from None
    kind = tvm_target.kind.name
    if kind == "llvm":
        codegen = tvm.target.codegen
        mcpu = target.get("mcpu")
        if mcpu and mcpu not in {str(c) for c in codegen.llvm_get_cpu_archlist(tvm_target)}:
            raise EtaError(f"target {target}: LLVM {codegen.llvm_version_major()} knows no CPU named {mcpu!r} "
                           f"(this machine is {codegen.llvm_get_system_cpu()})")
        if runs_here and mcpu:
            host = tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})
            have = {str(f) for f in codegen.llvm_get_cpu_features(host)}
            missing = sorted(f for f in map(str, codegen.llvm_get_cpu_features(tvm_target)) if _ISA_FEATURE.match(f) and f not in have)
            if missing:
                raise EtaError(f"target {target} uses instructions this machine ({codegen.llvm_get_system_cpu()}) lacks: "
                               f"{', '.join(missing[:6])}; tune and time it on a machine that has them")
    if runs_here and kind == "cuda" and not tvm.cuda().exist:
        raise EtaError(f"target {target}: no CUDA GPU is visible on this machine")
    a = te.placeholder((4,), name="a")
    probe = te.create_prim_func([a, te.compute((4,), lambda i: a[i] + 1.0, name="b")])
    try:
        tvm.compile(tvm.IRModule({"main": probe}), target=tvm_target)
    except Exception as err:  # noqa: BLE001 - a missing toolchain or device library surfaces as many types
        raise EtaError(f"TVM cannot build for target {target}: {(str(err).strip().splitlines() or ['?'])[-1][:160]}") from None
