"""The runtimes a user could deploy to, side by side: the teacher and every front student under eager PyTorch,
``torch.compile``, untuned TVM and tuned TVM, timed by the same protocol in one run.

Each runtime has its own latency table (the tuned one tunes the networks' tasks its database lacks,
under the space's tuning budget, before timing); every network is timed afresh, none read from a table. PyTorch is timed before TVM runs in this process:
TVM's thread pool, once started, starves PyTorch's threads (eager timings here went from 1.8 ms to
over 80 ms after TVM had run). It prints every figure, which runtime is fastest for each network,
and the students' speed-ups over the teacher on each runtime, and writes them as JSON.

    python -m benchmarks.deployment runs/digits
    python -m benchmarks.deployment runs/fashion --max-latency-ms 0.39 --tune-trials 32   # one student, deeper schedules

``--max-latency-ms`` keeps the students ``eta export --max-latency-ms`` would pick instead of the whole front;
``--tune-trials N`` first gives every task of the networks timed on tuned TVM up to N trials, those tuned
before with the space's smaller budget included (``latency.tune.deepen``).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eta.files import write_json
from eta.pareto import format_table

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.deployment")

RUNTIMES = (("eager", "torch", False, False), ("torch.compile", "torch", False, True),
            ("tvm untuned", "tvm", False, False), ("tvm tuned", "tvm", True, False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--runtimes", nargs="+", default=[r[0] for r in RUNTIMES], choices=[r[0] for r in RUNTIMES])
    ap.add_argument("--out", type=Path, default=Path("docs/measurements"))
    ap.add_argument("--max-latency-ms", type=float, nargs="+", help="the students eta export would pick under these limits "
                    "(default: every front student)")
    ap.add_argument("--tune-trials", type=int, help="tuned TVM: deepen every task of the networks timed to this many trials")
    args = ap.parse_args(argv)
    if args.tune_trials is not None and args.tune_trials < 1:
        ap.error(f"--tune-trials {args.tune_trials}: at least one trial per task")
    setup_logging()
    from eta.export import build_student, pick, read_front
    from eta.latency.backends import schedule_policy
    from eta.latency.measurer import Measurer
    from eta.phases import latency
    from eta.runs import Run

    search, info, _, _ = load_solved_run(args.run)
    space, bound = search.space, search.bound
    run = Run(search.run.root)
    front = read_front(run).front if not args.max_latency_ms else [pick(run, ms) for ms in args.max_latency_ms]
    if args.tune_trials:  # the space's tuning settings, deepened: every task of these networks up to N trials
        space = space.model_copy(deep=True)
        space.latency.tune_trials = 0  # the trials asked for, not a space's older setting, and no time limit
        space.latency.tune.trials_per_task, space.latency.tune.deepen, space.latency.tune.max_minutes = args.tune_trials, True, None
    models = [("teacher", bound.teacher, space.data.resolution)] + [
        (f"{p['arch']} @{p['resolution']}", build_student(run, p, bound), p["resolution"]) for p in front]
    protocol = latency.measurer_protocol(space)
    rows = [{"model": name, "resolution": r} for name, _, r in models]
    for label, backend, tuned, compiled in RUNTIMES:  # PyTorch first: see the module docstring
        if label not in args.runtimes:
            continue
        m = Measurer.create(backend, "cpu" if backend == "torch" else "llvm", protocol, schedule_policy(backend, tuned, compiled))
        table = m.open_table()
        workloads = [latency.model_workload(bound, model.eval(), r) for _, model, r in models]
        if tuned:
            latency.tune(space, m, table, workloads, name=f"deployment {run.root.name}")
        log.info("%s: timing %d networks (%s, %s on %s)", label, len(workloads), m.backend, m.schedule, m.device)
        # timed afresh, not read from the table: a cached figure carries the machine's drift since it was taken
        for row, ms in zip(rows, table.time_now(workloads, m.executor())):
            row[label] = ms
    labels = [r for r in args.runtimes]
    for row in rows:
        times = {k: row[k] for k in labels if row.get(k)}
        row["fastest"] = min(times, key=times.get) if times else None
    teacher = rows[0]
    for row in rows[1:]:
        for k in labels:
            if row.get(k) and teacher.get(k):
                row[f"speedup {k}"] = teacher[k] / row[k]
    cols = [("model", "network", "s"), ("resolution", "res", "d")] + [(k, f"{k} ms", ".3f") for k in labels] + [("fastest", "fastest", "s")]
    print(f"\n{run.root.name}: the teacher and the front's students on every runtime ({protocol.repeat} repeats, same protocol)\n")
    print(format_table(rows, cols))
    print("\nspeed-up over the teacher on the same runtime:\n" + format_table(
        rows[1:], [("model", "student", "s")] + [(f"speedup {k}", k, ".2f") for k in labels]))
    eager_teacher = teacher.get("eager")
    if eager_teacher:
        best = {row["model"]: min(row[k] for k in labels if row.get(k)) for row in rows[1:]}
        print("\nspeed-up over the eager teacher users start from (student on its fastest runtime): " +
              ", ".join(f"{n} {eager_teacher / ms:.1f}x" for n, ms in best.items()))
    suffix = f"-tuned{args.tune_trials}" if args.tune_trials else ""
    out = args.out / f"deployment-{run.root.name}{suffix}.json"
    write_json(out, {"run": run.root.name, "device": info.device, "tune_trials": args.tune_trials or space.latency.trials_per_task,
                     "rows": rows})
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
