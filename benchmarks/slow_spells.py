"""Timings with and without waiting out the machine's slow spells: the same compiled networks, again and again.

The teacher and the front's students of a finished run are compiled once (the run's target and
schedules) and timed ``--rounds`` times by the run's protocol, alternately with the steadiness check
(``latency.max_slowdown``) and without it, a short pause between rounds so that both see the same
mix of fast and slow spells. Printed per network and setting: the fastest, median, 90th-percentile
and slowest timing, the share of timings within 10 % of the fastest, and the seconds one timing cost.

    python -m benchmarks.slow_spells runs/digits --rounds 30
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from eta.pareto import format_table

from .common import load_solved_run, run_command, setup_logging


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--pause-s", type=float, default=0.3, help="between rounds")
    ap.add_argument("--students", type=int, default=2, help="front students timed beside the teacher")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error(f"--rounds {args.rounds}: at least two")
    setup_logging()
    from eta.export import build_student, read_front
    from eta.latency import tvm_backend
    from eta.latency.backends import uses_schedules
    from eta.latency.table import schedules_database
    from eta.phases.latency import measurer_protocol
    from eta.runs import Run

    search, info, _, _ = load_solved_run(args.run)
    bound, run = search.bound, Run(search.run.root)
    if info.backend != "tvm":
        from eta.errors import EtaError

        raise EtaError(f"{args.run}: its table was measured with {info.backend}; this benchmark compiles with TVM")
    db = schedules_database(info.target) if uses_schedules(info.schedule) else None
    res = bound.space.data.resolution
    nets = [("teacher", bound.teacher.eval(), res)] + [
        (f"{p['arch']} @{p['resolution']}", build_student(run, p, bound).eval(), p["resolution"]) for p in read_front(run).front[:args.students]]
    compiled = [(name, tvm_backend.compile_module(m, bound.input_shape(r, bound.space.latency.batch_size), info.target, db))
                for name, m, r in nets]
    checked = measurer_protocol(bound.space)
    settings = {"waits": checked if checked.max_slowdown else dataclasses.replace(checked, max_slowdown=1.25),
                "no check": dataclasses.replace(checked, max_slowdown=None)}
    times = {(n, k): [] for n, _ in compiled for k in settings}
    spent = {k: 0.0 for k in settings}
    for r in range(args.rounds):
        for k in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
            for name, c in compiled:
                t0 = time.perf_counter()
                times[(name, k)].append(c.time(settings[k]).median_ms)
                spent[k] += time.perf_counter() - t0
        time.sleep(args.pause_s)
    rows = []
    for name, _ in compiled:
        for k in settings:
            a = np.array(times[(name, k)])
            rows.append({"net": name, "setting": k, "min": a.min(), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
                         "max": a.max(), "near": float(np.mean(a <= 1.1 * a.min())), "s": spent[k] / args.rounds / len(compiled)})
    print(f"\n{run.root.name}: {args.rounds} rounds on {info.device} ({info.backend}, {info.schedule}), alternating; "
          f"'waits': max_slowdown {settings['waits'].max_slowdown}, settle_s {settings['waits'].settle_s}\n")
    print(format_table(rows, [("net", "network", "s"), ("setting", "timing", "s"), ("min", "min ms", ".3f"), ("median", "median ms", ".3f"),
                              ("p90", "p90 ms", ".3f"), ("max", "max ms", ".3f"), ("near", "within 10 % of min", ".2f"),
                              ("s", "s per timing", ".2f")]))
    return 0


if __name__ == "__main__":
    run_command(main)
