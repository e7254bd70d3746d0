"""The runtimes a user could deploy to, side by side: the teacher and every front student under eager PyTorch,
``torch.compile``, untuned TVM and tuned TVM, timed by the same protocol in one run.

Each runtime has its own latency table (the tuned one tunes the networks' tasks its database lacks,
under the space's tuning budget, before timing); every network is timed afresh, none read from a table. PyTorch is timed before TVM runs in this process:
TVM's thread pool, once started, starves PyTorch's threads (eager timings here went from 1.8 ms to
over 80 ms after TVM had run). It prints every figure, which runtime is fastest for each network,
and the students' speed-ups over the teacher on each runtime, and writes them as JSON.

    python -m benchmarks.deployment runs/digits
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eta.files import write_json
from eta.pareto import format_table

from .common import load_solved_run, setup_logging

log = logging.getLogger("benchmarks.deployment")

RUNTIMES = (("eager", "torch", False, False), ("torch.compile", "torch", False, True),
            ("tvm untuned", "tvm", False, False), ("tvm tuned", "tvm", True, False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--runtimes", nargs="+", default=[r[0] for r in RUNTIMES], choices=[r[0] for r in RUNTIMES])
    ap.add_argument("--out", type=Path, default=Path("docs/measurements"))
    args = ap.parse_args(argv)
    setup_logging()
    from eta.export import build_student, read_front
    from eta.latency.backends import schedule_policy
    from eta.latency.measurer import Measurer
    from eta.phases import latency
    from eta.runs import Run

    search, info, _, _ = load_solved_run(args.run)
    space, bound = search.space, search.bound
    run = Run(search.run.root)
    front = read_front(run).front
    models = [("teacher", bound.teacher, space.data.resolution)] + [
        (f"{p['arch']} @{p['resolution']}", build_student(run, p), p["resolution"]) for p in front]
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
    out = args.out / f"deployment-{run.root.name}.json"
    write_json(out, {"run": run.root.name, "device": info.device, "rows": rows})
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
