"""The latency lookup table of a bound search space, and whole-network measurements.

Every distinct (operator, shapes, bit-width) a space can produce is measured once on the target
and cached in a shared table under ``predictors/latency/``; the teacher's own blocks, stem and
head are measured too. A few whole networks (the teacher and random students) are compiled end
to end to fit HAO's calibration, latency ≈ a·Σ table + b, which the optimiser uses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arch import arch_to_str
from .bound import BoundSpace, module_digest
from .errors import EtaError
from .latency import calibrate as calib
from .latency.protocol import Protocol
from .latency.table import LatencyTable, default_table_path
from .student import _standalone, skeleton

log = logging.getLogger(__name__)

REPO_PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"


def predictors_dir() -> Path:
    """Where shared tables live: ``$ETA_PREDICTORS_DIR``, else the repository's ``predictors/``."""
    import os

    return Path(os.environ.get("ETA_PREDICTORS_DIR") or REPO_PREDICTORS)


@dataclass
class Backend:
    """Where and how latency is measured: the backend name, its target and the device's name."""

    name: str
    target: dict
    device: str
    protocol: Protocol

    @classmethod
    def from_space(cls, bound: BoundSpace) -> "Backend":
        cfg = bound.space.latency
        protocol = Protocol(number=cfg.number, repeat=cfg.repeat, max_cv=cfg.max_spread)
        if cfg.backend == "tvm":
            from .latency import tvm_backend

            target = tvm_backend.host_target(cfg.target)
            return cls("tvm", target, tvm_backend.device_name(target), protocol)
        from .latency import torch_backend

        dev = "cuda" if cfg.target == "cuda" else "cpu"
        return cls("torch", {"kind": dev}, torch_backend.device_name(dev), protocol)



def table_path(backend: Backend, root: Path | None = None) -> Path:
    return default_table_path(root or predictors_dir() / "latency", backend.name, backend.target, backend.device)


def open_table(backend: Backend, root: Path | None = None) -> LatencyTable:
    return LatencyTable.open(table_path(backend, root), backend=backend.name, target=backend.target, device=backend.device, protocol=backend.protocol)


def _signature(kind: str, module: torch.nn.Module) -> str:
    return f"{kind}#{module_digest(module)}"


def block_input_shape(bound: BoundSpace, block: int, batch: int) -> tuple:
    return (batch, *bound.shapes[block][0])


def table_items(bound: BoundSpace) -> list:
    """(signature, factory, input shape, bits) for the stem, head, and every option of every block."""
    batch = bound.space.latency.batch_size
    split = bound.split
    items = []
    stem_in = bound.input_shape(batch=batch)
    items.append((_signature("stem", split.stem), lambda: split.stem, stem_in, 32))
    head_in = (batch, *bound.shapes[-1][1])
    items.append((_signature("head", split.head), lambda: split.head, head_in, 32))
    seen = set()
    for b, opts in enumerate(bound.options):
        for spec in opts:
            if spec.family == "identity":
                continue
            module = _standalone(bound, b, spec)
            sig = _signature(str(spec.with_bits(32)), module)
            key = (sig, block_input_shape(bound, b, batch), spec.bits)
            if key in seen:
                continue
            seen.add(key)
            items.append((sig, (lambda m=module: m), key[1], spec.bits))
    return items


def option_latency_matrix(bound: BoundSpace, table: LatencyTable) -> tuple[float, list[np.ndarray]]:
    """(stem + head ms, per-block ms of each option) read from the table; identity costs 0."""
    batch = bound.space.latency.batch_size
    split = bound.split
    base = table.get(_signature("stem", split.stem), bound.input_shape(batch=batch), 32)
    head = table.get(_signature("head", split.head), (batch, *bound.shapes[-1][1]), 32)
    if base is None or head is None:
        raise EtaError("latency table lacks the stem or head entry: run 'eta latency' first")
    per_block = []
    for b, opts in enumerate(bound.options):
        row = []
        for spec in opts:
            if spec.family == "identity":
                row.append(0.0)
                continue
            module = _standalone(bound, b, spec)
            ms = table.get(_signature(str(spec.with_bits(32)), module), block_input_shape(bound, b, batch), spec.bits)
            if ms is None:
                raise EtaError(f"block {b} operator {spec}: no executable latency entry on {table.path} (bit-width {spec.bits} not executable on this target?)")
            row.append(float(ms))
        per_block.append(np.array(row))
    return float(base + head), per_block


def calibrate(bound: BoundSpace, table: LatencyTable, base: float, per_block: list[np.ndarray], *, n_students: int, seed: int, progress: bool = True) -> dict:
    """Compile the teacher and ``n_students`` random students end to end; fit measured ≈ a·Σtable + b."""
    rng = np.random.default_rng(seed)
    shape = bound.input_shape(batch=bound.space.latency.batch_size)
    archs = []
    tc = bound.teacher_choices()
    if tc is not None:
        archs.append(tc)
    while len(archs) < n_students + (tc is not None) and len(archs) < bound.space_size():
        c = tuple(int(rng.integers(k)) for k in bound.options_per_block)
        if c not in archs:
            archs.append(c)
    models = [skeleton(bound, bound.arch(c)) for c in archs]
    items = [(_signature("network", m), (lambda m=m: m), shape, 32) for m in models]
    table.measure_many(items, desc="latency calibration (whole networks)", progress=progress)
    rows = []
    for c, (sig, _, _, _) in zip(archs, items):
        e = table.entry(sig, shape, 32)
        pred = base + sum(per_block[b][j] for b, j in enumerate(c))
        rows.append({"arch": arch_to_str(bound.arch(c)), "table_sum_ms": float(pred), "measured_ms": float(e["median_ms"]), "spread": float(e["spread"])})
    pred = np.array([r["table_sum_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    a, b = float(np.median(meas / np.maximum(pred, 1e-9))), 0.0  # a ratio when too few points for a line
    if len(rows) >= 5 and np.ptp(pred) > 0:
        cal = calib.fit_calibration(pred, meas)
        # a line is kept only where it stays positive over every student of the space
        r = calib.agreement(pred, meas)["pearson_r"]
        fastest = base + sum(float(np.min(row)) for row in per_block)
        if r < 0.9:
            log.warning("latency table agrees poorly with whole networks (Pearson r %.2f); using a ratio, not a line. "
                        "Was the machine busy while measuring? Re-measure on a quiet machine.", r)
        elif cal.a <= 0 or cal.a * fastest + cal.b <= 0:
            log.warning("the calibration line (a=%.3f, b=%.3f ms) would predict a non-positive latency for the fastest "
                        "student; using a ratio instead", cal.a, cal.b)
        else:
            a, b = cal.a, cal.b
    before = calib.agreement(pred, meas) if len(rows) >= 3 else {}
    after = calib.agreement(a * pred + b, meas) if len(rows) >= 3 else {}
    return {"a": float(a), "b": float(b), "students": rows, "before": _jsonable(before), "after": _jsonable(after)}


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d
