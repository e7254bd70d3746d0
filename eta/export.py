"""Getting students out of a run: pick from the front, rebuild, export for plain PyTorch.

An export folder holds ``architecture.json`` (what the student is, and what the front promised),
``weights.safetensors`` (its state dict) and ``student.pt2`` (a ``torch.export`` program that loads
with ``torch.export.load(path).module()`` and needs neither eta nor the teacher's code).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .arch import arch_from_str
from .bound import BoundSpace
from .errors import EtaError
from .runs import Run, atomic_path, load_tensors, read_json, save_tensors, write_json
from .student import skeleton

log = logging.getLogger(__name__)


def pick(run: Run, max_latency_ms: float | None = None, resolution: int | None = None) -> dict:
    """The most accurate front entry within the latency limit (and at ``resolution`` if given)."""
    path = run.root / "pareto.json"
    if not path.exists():
        raise EtaError(f"{run.root} has no pareto.json yet: finish the search first (eta search / eta finetune)")
    pareto = read_json(path)
    pool = pareto["front"] if resolution is None else [p for p in pareto["all"] if p["resolution"] == resolution]
    if not pool:
        raise EtaError(f"no student at resolution {resolution} in {path}")
    ok = [p for p in pool if max_latency_ms is None or p["latency_ms"] <= max_latency_ms]
    if not ok:
        fastest = min(p["latency_ms"] for p in pool)
        raise EtaError(f"no student of {run.root.name} runs within {max_latency_ms} ms; the fastest takes {fastest:.3f} ms")
    return max(ok, key=lambda p: (p["test_acc"], -p["latency_ms"]))


def build_student(run: Run, entry: dict) -> torch.nn.Module:
    space = run.space()
    shape = read_json(run.root / "latency" / "latency.json").get("io", {})
    bound = BoundSpace.build(space, in_chans=shape.get("in_chans", 1), num_classes=shape.get("num_classes", 10))
    arch = arch_from_str(entry["arch"])
    model = skeleton(bound, arch)
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


def export_student(run_dir: Path, out_dir: Path, max_latency_ms: float | None = None, resolution: int | None = None, force: bool = False) -> dict:
    run = Run.open(Path(run_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise EtaError(f"{out_dir} exists and is not empty; pass --force to overwrite")
    entry = pick(run, max_latency_ms, resolution)
    model = build_student(run, entry)
    info = model.eta_info
    x = torch.randn(2, info["in_chans"], entry["resolution"], entry["resolution"])
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "student.pt2") as tmp:
        torch.export.save(program, str(tmp))
    save_tensors(out_dir / "weights.safetensors", model.state_dict(), {"arch": entry["arch"]})
    meta = {
        "format": "eta-student/1",
        "run": run.root.name,
        "teacher": run.space().teacher.model,
        "input_shape": ["batch", *x.shape[1:]],
        "load_with": "torch.export.load('student.pt2').module()",
        **{k: v for k, v in info.items() if k != "weights"},
    }
    write_json(out_dir / "architecture.json", meta)
    return meta


def load_exported(out_dir: Path) -> torch.nn.Module:
    """Plain PyTorch: the exported program as a module."""
    return torch.export.load(str(Path(out_dir) / "student.pt2")).module()
