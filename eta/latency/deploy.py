"""The deployable artefact: a float module compiled by TVM with the table's schedules, as one shared library.

What the front promises is the latency of this file: the same schedules (the table's database)
and the same compiler as the measurement. It is a ``.so`` that TVM's runtime loads
(``tvm.runtime.load_module`` + ``relax.VirtualMachine``), with a JSON sidecar saying what it is
(input shape, target, TVM version, schedule digest). Unlike the measurement cache, the artefact
carries the module's own weights: its cache key includes a digest of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import EtaError
from . import schedules

log = logging.getLogger(__name__)

FORMAT = "eta-tvm-library/1"


def sidecar_path(path) -> Path:
    """``student.so`` -> ``student.tvm.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".tvm.json")


def weights_key(module) -> str:
    """A key naming the module's structure (its printed form, class) and every parameter and buffer value."""
    import torch

    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "export#" + h.hexdigest()[:24]


def export_library(module, input_shape, target: dict, path, database_dir=None) -> dict:
    """Write ``module`` compiled for ``target`` at ``input_shape`` (with ``database_dir``'s schedules) to ``path``.

    Returns what the sidecar records. Compiled through the compiled-module cache, so exporting the
    same weights again, or exporting a student the caller just compiled, costs a copy.
    """
    from .compile_cache import compiled_module, record_path

    path = Path(path)
    if path.suffix != ".so":
        raise EtaError(f"a TVM library is written as a .so file, not {path.name}")
    input_shape = tuple(int(d) for d in input_shape)
    compiled = compiled_module(module, input_shape, target, key=weights_key(module), database_dir=database_dir)
    cached = json.loads(record_path(compiled.path).read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compiled.path, path)
    info = {"format": FORMAT, "library": path.name, "input_shape": list(input_shape), "input_dtype": "float32",
            "target": schedules.canonical_target(target), "tvm_version": schedules.tvm_version(),
            "schedules": cached.get("schedules"), "tuned_functions": compiled.tuned_functions,
            "database_dir": None if database_dir is None else str(database_dir), "compile_s": cached.get("compile_s"),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "load": "import tvm; from tvm import relax; vm = relax.VirtualMachine(tvm.runtime.load_module(PATH), tvm.cpu()); "
                    "y = vm['main'](tvm.runtime.tensor(x, tvm.cpu()))[0].numpy()"}
    sidecar_path(path).write_text(json.dumps(info, indent=1) + "\n")
    return info


class ExportedLibrary:
    """A loaded TVM library: call it on numpy arrays (one output: an array; several: a list)."""

    def __init__(self, path, device: str = "cpu"):
        import tvm
        from tvm import relax

        self.path = Path(path)
        if not self.path.is_file():
            raise EtaError(f"missing TVM library: {self.path}")
        side = sidecar_path(self.path)
        self.info = json.loads(side.read_text()) if side.is_file() else {}
        if self.info.get("tvm_version") not in (None, schedules.tvm_version()):
            raise EtaError(f"{self.path} was compiled with TVM {self.info['tvm_version']}; this is TVM {schedules.tvm_version()}: "
                           f"export it again")
        self.device = tvm.cuda() if device == "cuda" else tvm.cpu()
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.path)), self.device)
        except Exception as err:  # noqa: BLE001 - a damaged file or another TVM build
            raise EtaError(f"cannot load TVM library {self.path}: {(str(err).strip().splitlines() or ['?'])[-1][:160]}") from None

    def __call__(self, x: np.ndarray):
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), self.device))
        if hasattr(out, "numpy"):
            return out.numpy()
        outs = [o.numpy() for o in out]
        return outs[0] if len(outs) == 1 else outs


def load_exported_library(path, device: str = "cpu") -> ExportedLibrary:
    return ExportedLibrary(path, device)


def check_exported(module, path, input_shape=None, *, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0) -> float:
    """The largest absolute difference between the library's and the PyTorch module's outputs on a random input.

    Raises a one-line EtaError when they differ by more than ``atol + rtol * |torch output|``.
    """
    import torch

    lib = load_exported_library(path)
    shape = tuple(input_shape or lib.info.get("input_shape") or ())
    if not shape:
        raise EtaError(f"{path}: no input shape recorded; pass input_shape")
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x))
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = lib(x)
    got = [got] if isinstance(got, np.ndarray) else list(got)
    if len(got) != len(want):
        raise EtaError(f"{path}: {len(got)} outputs, the PyTorch module has {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise EtaError(f"{path}: output shape {g.shape}, the PyTorch module gives {w.shape}")
        diff = np.abs(g - w)
        worst = max(worst, float(diff.max(initial=0.0)))
        if np.any(diff > atol + rtol * np.abs(w)):
            raise EtaError(f"{path}: outputs differ from the PyTorch module by up to {float(diff.max()):.3g}")
    return worst
