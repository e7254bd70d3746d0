"""The latency lookup table of a bound search space, and whole-network measurements.

Every distinct (operator, shapes, bit-width) a space can produce is measured once on the target
and cached in a shared table under ``predictors/latency/``; the teacher's own blocks, stem and
head are measured too. A few whole networks (the teacher and random students) are compiled end
to end to fit HAO's calibration, latency ≈ a·Σ table + b, which the optimiser uses.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arch import OpSpec, arch_to_str
from .bound import BoundSpace, module_digest
from .errors import EtaError
from .latency import calibrate as calib
from .latency.protocol import Protocol
from .latency.table import LatencyTable, default_table_path, measure_entry, schedule_policy
from .student import _standalone, latency_network

log = logging.getLogger(__name__)

REPO_PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"


def predictors_dir() -> Path:
    """Where shared tables live: ``$ETA_PREDICTORS_DIR``, else the repository's ``predictors/``."""
    import os

    return Path(os.environ.get("ETA_PREDICTORS_DIR") or REPO_PREDICTORS)


@dataclass
class Backend:
    """Where and how latency is measured: backend, target, device name, schedule policy, protocol.

    ``node_resource`` names a Ray custom resource (``latency:rpi4``); measurements then run as Ray
    tasks on the node that holds it, and target and device name are read on that node.
    """

    name: str
    target: dict
    device: str
    protocol: Protocol
    schedule: str = "untuned"
    node_resource: str | None = None

    @classmethod
    def from_space(cls, bound: BoundSpace) -> "Backend":
        cfg = bound.space.latency
        protocol = Protocol(number=cfg.number, repeat=cfg.repeat, max_cv=cfg.max_spread)
        schedule = schedule_policy(cfg.backend, cfg.tune_trials, cfg.torch_compile)
        if cfg.node_resource:
            import ray

            if not ray.is_initialized():
                raise EtaError(f"latency.node_resource {cfg.node_resource!r} needs a Ray cluster (pass --address)")
            if cfg.node_resource not in ray.cluster_resources():
                raise EtaError(f"latency.node_resource: no node of the Ray cluster has resource {cfg.node_resource!r}; start one with "
                               f"ray start --address=<head> --resources='{{\"{cfg.node_resource}\": 1}}'")
            task = ray.remote(describe_target).options(num_cpus=0, resources={cfg.node_resource: 0.001})
            target, device = _get_from_node(task.remote(cfg.backend, cfg.target), cfg.node_resource)
        else:
            target, device = describe_target(cfg.backend, cfg.target)
        return cls(cfg.backend, target, device, protocol, schedule, cfg.node_resource)

    def executor(self):
        """How one table entry is measured: here, or as a Ray task on the node with ``node_resource``."""
        if not self.node_resource:
            return measure_entry
        import ray

        # one measurement at a time on that node, holding all of its latency resource, so nothing else runs beside it
        task = ray.remote(measure_entry).options(num_cpus=1, resources={self.node_resource: 1}, max_retries=2)

        def run_on_node(provenance, module, shape, bits, database_dir):
            return _get_from_node(task.remote(provenance, module, shape, bits, database_dir), self.node_resource)

        return run_on_node


def describe_target(backend: str, kind: str) -> tuple[dict, str]:
    """The target dict and device name of the machine this runs on (called on the measuring node)."""
    if backend == "tvm":
        from .latency import tvm_backend

        target = tvm_backend.host_target(kind)
        return target, tvm_backend.device_name(target)
    from .latency import torch_backend

    dev = "cuda" if kind == "cuda" else "cpu"
    return {"kind": dev}, torch_backend.device_name(dev)


def _get_from_node(ref, resource: str, timeout_s: float = 3600):
    import ray

    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise EtaError(f"no Ray node with resource {resource!r} measured within {timeout_s:.0f} s "
                       f"(start one with: ray start --address=... --resources='{{\"{resource}\": 1}}')")
    return ray.get(ref)


def table_path(backend: Backend, root: Path | None = None) -> Path:
    return default_table_path(root or predictors_dir() / "latency", backend.name, backend.target, backend.device, backend.schedule)


def open_table(backend: Backend, root: Path | None = None) -> LatencyTable:
    return LatencyTable.open(table_path(backend, root), backend=backend.name, target=backend.target, device=backend.device,
                             protocol=backend.protocol, schedule=backend.schedule, passes=2)


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


def space_key(items: list) -> str:
    """Names the set of table entries a space uses: its calibration is stored in the table under this key."""
    import hashlib

    keys = sorted(LatencyTable.key(sig, shape, bits) for sig, _, shape, bits in items)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def calibration_archs(bound: BoundSpace, n_students: int, seed: int, stored: dict | None = None) -> list[tuple]:
    """The teacher (when it is a choice of the space) and ``n_students`` distinct random students.

    Students a stored calibration already measured come first, so a later call with the same or
    fewer students re-uses them from the table instead of compiling new ones.
    """
    archs = [tuple(c) for c in (stored or {}).get("choices", [])]
    tc = bound.teacher_choices()
    if tc is not None and tc not in archs:
        archs.insert(0, tc)
    want = n_students + (tc is not None)
    rng = np.random.default_rng(seed)
    while len(archs) < want and len(archs) < bound.space_size():
        c = tuple(int(rng.integers(k)) for k in bound.options_per_block)
        if c not in archs:
            archs.append(c)
    return archs


def calibrate(bound: BoundSpace, table: LatencyTable, base: float, per_block: list[np.ndarray], *, n_students: int, seed: int,
              progress: bool = True, executor=None, items: list | None = None) -> dict:
    """Compile the teacher and random students end to end; fit measured ≈ a·Σtable (+ c·operators) + b.

    The fit is stored in the table under the space's key; a calibration with at least as many
    students there (``eta latency validate`` measures 50) is re-used, not re-measured.
    """
    key = space_key(items or table_items(bound))
    stored = table.calibrations.get(key)
    archs = calibration_archs(bound, n_students, seed, stored)
    shape = bound.input_shape(batch=bound.space.latency.batch_size)
    models = [latency_network(bound, bound.arch(c)) for c in archs]
    net_items = [(_signature("network", m), (lambda m=m: m), shape, 32) for m in models]
    table.measure_many(net_items, desc="latency calibration (whole networks)", progress=progress, executor=executor)
    identity, integer = option_masks(bound.options)
    rows = []
    for c, (sig, _, _, _) in zip(archs, net_items):
        e = table.entry(sig, shape, 32)
        rows.append({"arch": arch_to_str(bound.arch(c)), "choices": list(c),
                     "table_sum_ms": float(base + sum(per_block[b][j] for b, j in enumerate(c))),
                     "int_table_ms": float(sum(per_block[b][j] for b, j in enumerate(c) if integer[b][j])),
                     "operators": int(sum(not identity[b][j] for b, j in enumerate(c))),
                     "measured_ms": float(e["median_ms"]), "spread": float(e["spread"])})
    out = fit_rows(rows, base, per_block, identity, integer)
    out["space_key"] = key
    if len(rows) > len((stored or {}).get("choices", [])):
        table.set_calibration(key, {k: v for k, v in out.items() if k != "students"} | {"choices": [r["choices"] for r in rows],
                                   "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return out


def option_masks(options) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block, which options are identity and which run as integer kernels (bits < 32).

    ``options`` holds OpSpecs or their strings (as ``latency.json`` stores them).
    """
    specs = [[OpSpec.parse(o) if isinstance(o, str) else o for o in opts] for opts in options]
    return ([np.array([s.family == "identity" for s in opts]) for opts in specs],
            [np.array([s.bits < 32 for s in opts]) for opts in specs])


def calibration_terms(rows: list[dict]) -> dict[str, dict]:
    """The calibrations worth trying on these whole-network rows: name -> extra terms of the fit.

    A term needs 8 networks and some variation to be estimated at all.
    """
    n_ops = np.array([r["operators"] for r in rows])
    int_sum = np.array([r.get("int_table_ms", 0.0) for r in rows])
    terms = {"line": {}}
    if len(rows) >= 8 and np.ptp(n_ops) > 0:
        terms["line+boundary"] = {"n_ops": n_ops}
    if len(rows) >= 8 and np.ptp(int_sum) > 0:
        terms["line+precision"] = {"int_sum": int_sum}
        if "line+boundary" in terms:
            terms["line+precision+boundary"] = {"n_ops": n_ops, "int_sum": int_sum}
    return terms


def fit_rows(rows: list[dict], base: float, per_block: list[np.ndarray], identity: list[np.ndarray],
             integer: list[np.ndarray] | None = None) -> dict:
    """Choose and fit the calibration: HAO's line, the line with a boundary term and/or a separate
    scale for integer entries, or a plain ratio.

    An extra term is kept only when it lowers the cross-validated error by a tenth against the
    line (the lowest such error wins); a line is kept only when the table agrees with whole
    networks (r >= 0.9) and it predicts a positive latency for the fastest student of the space.
    """
    pred = np.array([r["table_sum_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    n_ops = np.array([r["operators"] for r in rows])
    int_sum = np.array([r.get("int_table_ms", 0.0) for r in rows])
    cal = calib.Calibration(float(np.median(meas / np.maximum(pred, 1e-9))), 0.0)  # a ratio when too few points for a line
    kind, cv = "ratio", {}
    if len(rows) >= 5 and np.ptp(pred) > 0:
        cv["line"] = calib.cross_validated_mape(pred, meas)
        terms = calibration_terms(rows)
        for name, kw in terms.items():
            if name != "line":
                cv[name] = calib.cross_validated_mape(pred, meas, **kw)
        better = sorted((n for n in terms if n != "line" and cv[n] < 0.9 * cv["line"]), key=cv.get)
        candidates = [(n, calib.fit_calibration(pred, meas, **terms[n])) for n in better + ["line"]]
        r = calib.agreement(pred, meas)["pearson_r"]
        if r < 0.9:
            log.warning("latency table agrees poorly with whole networks (Pearson r %.2f); using a ratio, not a line. "
                        "Was the machine busy while measuring? Re-measure on a quiet machine.", r)
        else:
            for name, fit in candidates:
                eff = effective_option_ms(per_block, identity, fit, integer)
                fastest = fit.a * (base + sum(float(np.min(row)) for row in eff)) + fit.b
                if fit.a > 0 and (fit.a_int is None or fit.a_int > 0) and fastest > 0:
                    kind, cal = name, fit
                    break
                log.warning("the calibration %s (a=%.3f, b=%.3f ms, c=%.3f ms) would predict a non-positive latency "
                            "for the fastest student; trying a simpler one", name, fit.a, fit.b, fit.c)
    before = calib.agreement(pred, meas) if len(rows) >= 3 else {}
    after = calib.agreement(cal(pred, n_ops, int_sum), meas) if len(rows) >= 3 else {}
    return {"kind": kind, "a": cal.a, "b": cal.b, "c": cal.c, "a_int": cal.a_int, "students": rows, "before": _jsonable(before),
            "after": _jsonable(after), "cross_validated_mape": cv}


def calibration_from(stored: dict) -> "calib.Calibration":
    """The Calibration a stored fit (``latency.json``'s or the table's) describes."""
    a_int = stored.get("a_int")
    return calib.Calibration(float(stored["a"]), float(stored["b"]), float(stored.get("c", 0.0)),
                             None if a_int is None else float(a_int))


def effective_option_ms(per_block: list[np.ndarray], identity: list[np.ndarray], cal,
                        integer: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per-option latencies with the boundary term and the integer scale folded in.

    a·Σ(option·s + c/a·[not identity]) + b, with s = a_int/a for integer options and 1 otherwise,
    equals the calibrated latency, so the optimiser keeps its additive latency model and the line (a, b).
    """
    c, a = float(getattr(cal, "c", 0.0)), float(cal.a)
    a_int = getattr(cal, "a_int", None)
    out = []
    for b, row in enumerate(per_block):
        row = np.asarray(row, float)
        if a_int is not None and integer is not None:
            row = np.where(np.asarray(integer[b], bool), row * (float(a_int) / a), row)
        if c:
            row = row + (c / a) * (~np.asarray(identity[b], bool))
        out.append(row)
    return out


def plot_calibration(cal: dict, path: Path, title: str) -> None:
    """Measured against predicted latency, before and after calibration (HAO fig. 13.5's view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cal["students"]
    pred = np.array([r["table_sum_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    after = calibration_from(cal)(pred, [r["operators"] for r in rows], [r.get("int_table_ms", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(pred, meas, s=14, alpha=0.6, label=f"Σ table (r={cal['before']['pearson_r']:.4f}, MAPE {100 * cal['before']['mape']:.1f}%)")
    ax.scatter(after, meas, s=14, alpha=0.6, label=f"calibrated {cal['kind']} (r={cal['after']['pearson_r']:.4f}, MAPE {100 * cal['after']['mape']:.1f}%)")
    lo, hi = float(min(pred.min(), after.min(), meas.min())), float(max(pred.max(), after.max(), meas.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("measured whole-network latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
