"""Every calibration a run's latency phase could choose, judged on students it never saw: the run's finetuned front.

Each candidate (HAO's line, + boundary term, + integer scale, both) is fitted to the run's
calibration networks (``latency.json``) and predicts every finetuned student of the run at the base
resolution, against that student's end-to-end measurement (``pareto.json``). Also printed: how the
line's own error on the calibration networks follows the number of integer blocks, the pattern the
integer scale is there to remove.

    python -m benchmarks.calibration_holdout runs/digits_mixed
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eta.arch import OpSpec
from eta.errors import EtaError
from eta.files import read_json
from eta.latency import calibrate as calib
from eta.latency.calibrate import calibration_terms
from eta.pareto import format_table
from eta.phases.latency import option_masks, read_info
from eta.records import Front, LatencyInfo
from eta.runs import Run

from .common import run_command


def student_terms(arch: str, info: LatencyInfo) -> tuple[float, float, int]:
    """(table sum, integer entries' share of it, non-identity blocks) of one architecture string."""
    identity, integer = option_masks(info.options)
    total, ints, ops = float(info.base_ms), 0.0, 0
    for b, name in enumerate(arch.split("-")):
        j = info.options[b].index(str(OpSpec.parse(name)))
        total += info.option_ms[b][j]
        ints += info.option_ms[b][j] if integer[b][j] else 0.0
        ops += int(not identity[b][j])
    return total, ints, ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args(argv)
    run = Run.open(args.run)
    if not (run.latency_info.is_file() and run.pareto_json.is_file()):
        raise EtaError(f"{args.run}: needs {run.relative(run.latency_info)} and {run.relative(run.pareto_json)} (a finished run)")
    info, pareto = read_info(run), Front.from_dict(read_json(run.pareto_json))
    rows = info.calibration["students"]
    pred, meas = np.array([r["table_sum_ms"] for r in rows]), np.array([r["measured_ms"] for r in rows])
    terms = calibration_terms(rows)
    fits = {name: calib.fit_calibration(pred, meas, **kw) for name, kw in terms.items()}
    seen, students = set(), []
    for p in pareto.points(front_only=False):
        if p.arch in seen or p.predicted_latency_ms is None:
            continue  # one row per student, at the base resolution (the one the table describes)
        seen.add(p.arch)
        students.append((p.arch, p.latency_ms, *student_terms(p.arch, info)))
    table = []
    for name, fit in fits.items():
        errors = [(fit(total, ops, ints) - m) / m for _, m, total, ints, ops in students]
        table.append({"kind": name, "chosen": "yes" if name == info.calibration["kind"] else "",
                      "cv": 100 * info.calibration["cross_validated_mape"].get(name, float("nan")),
                      "mean": 100 * float(np.mean(np.abs(errors))), "lo": 100 * min(errors), "hi": 100 * max(errors)})
    print(f"\n{args.run.name}: {len(rows)} calibration networks; {len(students)} finetuned students, measured end to end\n")
    print(format_table(table, [("kind", "calibration", "s"), ("chosen", "chosen", "s"), ("cv", "5-fold MAPE % (calibration)", ".2f"),
                               ("mean", "mean |error| % (students)", ".1f"), ("lo", "min %", "+.1f"), ("hi", "max %", "+.1f")]))
    line = fits["line"]
    n_int = np.array([sum(1 for name in r["arch"].split("-") if OpSpec.parse(name).bits < 32) for r in rows])
    rel = (line(pred) - meas) / meas
    if np.ptp(n_int) > 0:
        print(f"\nthe line's error on its own networks against their number of integer blocks: Pearson r {np.corrcoef(n_int, rel)[0, 1]:+.2f}")
    return 0


if __name__ == "__main__":
    run_command(main)
