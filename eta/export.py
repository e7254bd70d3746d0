"""Getting students out of a run: pick from the front, rebuild, export for plain PyTorch.

An export folder holds ``architecture.json`` (what the student is, and what the front promised),
``weights.safetensors`` (its state dict), ``student.pt2`` (a ``torch.export`` program that loads
with ``torch.export.load(path).module()`` and needs neither eta nor the teacher's code) and
``student.onnx``. When the run measured with TVM, ``student.so`` is the float student compiled
with the same schedules its table used (the latency the front promised), with ``run_student.py``,
the few lines that run it with TVM's runtime alone; it is checked against PyTorch and timed again.
With
``integer=True`` (``eta export --int``) a quantized student is also compiled as one integer TVM
module, ``student_int.so`` (load with ``tvm.runtime.load_module`` and ``relax.VirtualMachine``),
checked against the fake-quantized PyTorch model on the test split and timed end to end; the
figures land in ``architecture.json`` beside what the front promised.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .arch import arch_from_str
from .bound import BoundSpace, splits_for
from .data import batches
from .errors import EtaError, first_line
from .files import atomic_path, load_tensors, read_json, save_tensors, write_json
from .latency import deploy
from .latency.backends import uses_schedules
from .latency.protocol import Protocol
from .latency.table import schedules_database
from .latency.tvm_backend import compile_module
from .quant.network import agreement, compile_network_int
from .records import Front, LatencyInfo
from .runs import Run
from .student import arch_bits, is_quantized, weights_skeleton
from .threads import torch_threads

log = logging.getLogger(__name__)


def read_front(run: Run) -> Front:
    path = run.pareto_json
    if not path.exists():
        raise EtaError(f"{run.root} has no pareto.json yet: finish the search first (eta search / eta finetune)")
    try:
        return Front.from_dict(read_json(path))
    except (KeyError, TypeError) as err:
        raise EtaError(f"{path}: not a Pareto front written by eta (missing {err})") from None


def pick(run: Run, max_latency_ms: float | None = None, resolution: int | None = None) -> dict:
    """The most accurate front entry within the latency limit (and at ``resolution`` if given)."""
    path = run.pareto_json
    pareto = read_front(run)
    pool = pareto.front if resolution is None else [p for p in pareto.all if p["resolution"] == resolution]
    if not pool:
        raise EtaError(f"no student at resolution {resolution} in {path}")
    ok = [p for p in pool if max_latency_ms is None or p["latency_ms"] <= max_latency_ms]
    if not ok:
        fastest = min(p["latency_ms"] for p in pool)
        raise EtaError(f"no student of {run.root.name} runs within {max_latency_ms} ms; the fastest takes {fastest:.3f} ms")
    return max(ok, key=lambda p: (p["test_acc"], -p["latency_ms"]))


def run_io(run: Run, space) -> tuple[int, int]:
    """(input channels, classes) of a run's data: as the latency phase recorded them, else read from the data."""
    info = LatencyInfo.from_dict(read_json(run.latency_info)) if run.latency_info.exists() else None
    if info is not None and info.io:
        return int(info.io["in_chans"]), int(info.io["num_classes"])
    splits = splits_for(space)  # runs from before the record named them
    return splits.in_chans, splits.num_classes


def build_student(run: Run, entry: dict, bound: BoundSpace | None = None) -> torch.nn.Module:
    """The finetuned student of a front entry; ``bound``: the run's bound space, when the caller builds many."""
    if bound is None:
        space = run.space()
        in_chans, num_classes = run_io(run, space)
        bound = BoundSpace.build(space, in_chans=in_chans, num_classes=num_classes)
    arch = arch_from_str(entry["arch"])
    model = weights_skeleton(bound, arch)
    state = load_tensors(run.root / entry["weights"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EtaError(f"{run.root / entry['weights']} does not match {entry['arch']}: {str(err).splitlines()[0]}") from None
    model.eval()
    model.eta_info = dict(entry, in_chans=bound.in_chans, num_classes=bound.num_classes)
    return model


def load_student(run, max_latency_ms: float | None = None, resolution: int | None = None) -> torch.nn.Module:
    run = run if isinstance(run, Run) else Run.open(Path(run))
    return build_student(run, pick(run, max_latency_ms, resolution))


def export_student(run_dir: Path, out_dir: Path, max_latency_ms: float | None = None, resolution: int | None = None, force: bool = False,
                   integer: bool = False) -> dict:
    run = Run.open(Path(run_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise EtaError(f"{out_dir} exists and is not empty; pass --force to overwrite")
    entry = pick(run, max_latency_ms, resolution)
    quantized = is_quantized(arch_from_str(entry["arch"]))
    if integer and not quantized:
        raise EtaError(f"--int: {entry['arch']} has no quantized block (search a space with bits: [32, 8] to get integer students)")
    if quantized and not integer:
        raise EtaError(f"{entry['arch']} is quantized: export it with --int (its deployable form is the integer TVM module)")
    model = build_student(run, entry)
    info = model.eta_info
    x = torch.randn(2, info["in_chans"], entry["resolution"], entry["resolution"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if not quantized:  # a fake-quantized model is not what deploys; its integer module is
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        with atomic_path(out_dir / "student.pt2") as tmp:
            torch.export.save(program, str(tmp))
        export_onnx(model, x, out_dir / "student.onnx")
    save_tensors(out_dir / "weights.safetensors", model.state_dict(), {"arch": entry["arch"]})
    meta = {
        "format": "eta-student/1",
        "run": run.root.name,
        "teacher": run.space().teacher.model,
        "input_shape": ["batch", *x.shape[1:]],
        "load_with": ("tvm.runtime.load_module('student_int.so') with tvm.relax.VirtualMachine" if quantized
                      else "torch.export.load('student.pt2').module()"),
        **{k: v for k, v in info.items() if k != "weights"},
    }
    if integer:
        meta["integer"] = export_integer(run, model, entry, out_dir)
    else:
        deployed = export_deployed(run, model, entry, out_dir)
        if deployed is not None:
            meta["deployed"] = deployed
    write_json(out_dir / "architecture.json", meta)
    return meta


def export_onnx(model, example, path: Path) -> None:
    """``student.onnx`` (dynamic batch) for ONNX runtimes; written atomically."""
    import warnings

    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    except Exception as err:  # noqa: BLE001 - the exporter raises many types for operators it cannot express
        raise EtaError(f"ONNX export of the student failed: {first_line(err)}") from None


def export_deployed(run: Run, model, entry: dict, out_dir: Path) -> dict | None:
    """The float student compiled by TVM with the schedules the run's table used (``student.so``), checked against
    PyTorch and timed again as the front's figure was; None when the run measured with another backend."""
    info = LatencyInfo.from_dict(read_json(run.latency_info))
    if info.backend != "tvm":
        return None
    space = run.space()
    r = entry["resolution"]
    shape = (space.latency.batch_size, model.eta_info["in_chans"], r, r)
    database = schedules_database(info.target) if uses_schedules(info.schedule) else None
    library = deploy.export_library(model, shape, info.target, out_dir / "student.so", database_dir=database)
    worst = deploy.check_exported(model, out_dir / "student.so", shape)
    protocol = Protocol.of(space.latency)
    compiled = compile_module(model, shape, info.target, database, key=deploy.weights_key(model))  # the library just written
    slower, latency = sorted((compiled.time(protocol) for _ in range(2)), key=lambda m: m.median_ms, reverse=True)
    write_text_atomic(out_dir / "run_student.py", RUN_SNIPPET.format(shape=list(shape)))
    out = {"module": "student.so", "schedule": info.schedule, "target": info.target, "schedules": library.get("schedules"),
           "max_abs_diff_vs_pytorch": worst, "latency_ms": latency.median_ms, "latency_spread": latency.spread,
           "slower_measurement_ms": slower.median_ms, "front_latency_ms": entry["latency_ms"], "run_with": "python run_student.py"}
    log.info("TVM library: %.3f ms (front: %.3f ms), outputs within %.1e of PyTorch", out["latency_ms"], out["front_latency_ms"], worst)
    return out


RUN_SNIPPET = '''"""Run the exported student with TVM's runtime alone (no eta, no PyTorch): python run_student.py"""
import numpy as np
import tvm
from tvm import relax

vm = relax.VirtualMachine(tvm.runtime.load_module("student.so"), tvm.cpu())
x = np.random.default_rng(0).standard_normal({shape}).astype("float32")  # a batch of normalised images
out = vm["main"](tvm.runtime.tensor(x, tvm.cpu()))
logits = (out if hasattr(out, "numpy") else out[0]).numpy()
print("predicted classes:", logits.argmax(1))
'''


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def export_integer(run: Run, model, entry: dict, out_dir: Path) -> dict:
    """Compile the quantized student as one integer TVM module, check it against PyTorch, time it."""
    space = run.space()
    info = LatencyInfo.from_dict(read_json(run.latency_info))
    target = info.target
    r = entry["resolution"]
    database = schedules_database(target) if uses_schedules(info.schedule) else None  # the schedules the front was timed with
    compiled = compile_network_int(model, (space.latency.batch_size, model.eta_info["in_chans"], r, r), target, database)
    with atomic_path(out_dir / "student_int.so") as tmp:
        compiled.executable.export_library(str(tmp))
    test = splits_for(space).test
    with torch_threads(1):
        agree = agreement(model, compiled, [x for x, _ in batches(test, 256, resolution=r)])
    protocol = Protocol.of(space.latency)
    # timed twice and the faster kept, as the front's figure was: one burst of load must not be the report
    slower, latency = sorted((compiled.time(protocol) for _ in range(2)), key=lambda m: m.median_ms, reverse=True)
    out = {"module": "student_int.so", "bits": arch_bits(arch_from_str(entry["arch"])), "target": target,
           "schedule": info.schedule, "tuned_functions": compiled.tuned_functions,
           "test_images": agree["n"], "top1_agreement": agree["top1_agreement"], "max_abs_logit_diff": agree["max_abs_diff"],
           "latency_ms": latency.median_ms, "latency_spread": latency.spread,
           "slower_measurement_ms": slower.median_ms, "front_latency_ms": entry["latency_ms"],
           "table_latency_ms": entry.get("predicted_latency_ms")}
    log.info("integer module: top-1 agreement %.4f on %d test images, %.3f ms (front: %.3f ms)", out["top1_agreement"],
             out["test_images"], out["latency_ms"], out["front_latency_ms"])
    return out


def load_exported(out_dir: Path) -> torch.nn.Module:
    """Plain PyTorch: the exported program as a module."""
    return torch.export.load(str(Path(out_dir) / "student.pt2")).module()
