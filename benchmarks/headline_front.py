"""eta's front against the teacher's own family: the teacher scaled by width multiplier and by input resolution.

From a finished run: every width-scaled teacher (``width_mult`` of the teacher's builder) is trained
with knowledge distillation from the teacher for the teacher's own epoch budget (generous to the
baseline: eta's students get phase 1 plus phase 3's epochs), and the teacher is finetuned at each
lower resolution of the space for phase 3's epochs. All are measured end to end with the run's
latency backend and evaluated on the test split. For each baseline point: eta's accuracy gain at
equal latency (its best front point no slower) and its speed-up at equal accuracy (its fastest
front point no less accurate).

    python -m benchmarks.headline_front runs/digits --widths 0.5 0.75
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

from eta.latency.table import Workload, workload_signature
from eta.pareto import format_table
from eta.train import evaluate, fit

from .common import load_solved_run, setup_logging

log = logging.getLogger("benchmarks.headline_front")


def compare(point: dict, front: list[dict]) -> dict:
    faster = [p for p in front if p["latency_ms"] <= point["latency_ms"]]
    better = [p for p in front if p["test_acc"] >= point["test_acc"]]
    return {"gain": (max(p["test_acc"] for p in faster) - point["test_acc"]) * 100 if faster else None,
            "speedup": point["latency_ms"] / min(p["latency_ms"] for p in better) if better else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.75])
    args = ap.parse_args(argv)
    setup_logging()
    from eta.files import read_json
    from eta.phases.latency import opened_table
    from eta.teachers import build_teacher

    search, info, _, _ = load_solved_run(args.run)
    bound, space = search.bound, search.space
    res, tc, p3 = space.data.resolution, space.teacher, space.finetune
    front = read_json(search.run.pareto_json)["front"]

    def latency(model, r):
        shape = bound.input_shape(r, batch=space.latency.batch_size)
        sig = workload_signature("network", model)
        table.measure_many([Workload(sig, lambda: model, shape, 32)], progress=False, executor=executor)
        return table.get(sig, shape, 32)

    with search.ctx.latency_session():  # a Ray session when a named node measures
        m, table = opened_table(search.ctx)
        executor = m.executor()
        rows = []
        for w in args.widths:
            model = build_teacher(tc.model, num_classes=bound.num_classes, in_chans=bound.in_chans, kwargs={**tc.kwargs, "width_mult": w})
            log.info("training the %.2fx-width teacher with distillation (%d epochs)", w, tc.train.epochs)
            fit(model, search.splits.train, epochs=tc.train.epochs, lr=tc.train.lr, weight_decay=tc.train.weight_decay,
                batch_size=tc.train.batch_size, resolutions=[res], teacher=bound.teacher, kd_weight=p3.kd_weight,
                temperature=p3.temperature, seed=space.seed, progress=False)
            rows.append({"model": f"teacher x{w:g} width", "resolution": res, "latency_ms": latency(model.eval(), res),
                         "test_acc": evaluate(model, search.splits.test, resolution=res)})
        for r in space.resolutions:
            if r == res:
                continue
            model = copy.deepcopy(bound.teacher)
            log.info("finetuning the teacher at %d px (%d epochs)", r, p3.epochs)
            fit(model, search.splits.train, epochs=p3.epochs, lr=p3.lr, weight_decay=p3.weight_decay, batch_size=p3.batch_size,
                resolutions=[r], teacher=bound.teacher, kd_weight=p3.kd_weight, temperature=p3.temperature, seed=space.seed, progress=False)
            rows.append({"model": f"teacher at {r} px", "resolution": r, "latency_ms": latency(model.eval(), r),
                         "test_acc": evaluate(model, search.splits.test, resolution=r)})
    rows.append({"model": "teacher", "resolution": res, "latency_ms": info.teacher_latency(res),
                 "test_acc": search.run.phase_info("teacher")["test_acc"][str(res)]})
    for r in rows:
        r.update(compare(r, front))
    print(f"\n{search.run.root.name}: eta's front ({len(front)} points, "
          f"{min(p['latency_ms'] for p in front):.3f}-{max(p['latency_ms'] for p in front):.3f} ms) against the teacher family; "
          f"latency end to end ({info.backend}, {info.device})\n")
    print(format_table(rows, [("model", "baseline", "s"), ("resolution", "res", "d"), ("latency_ms", "latency ms", ".3f"),
                              ("test_acc", "test acc", ".4f"), ("gain", "eta at equal latency (points)", "+.2f"),
                              ("speedup", "eta speed-up at equal accuracy", ".2f")]))
    print("\neta front:\n" + format_table(front, [("arch", "architecture", "s"), ("resolution", "res", "d"),
                                                  ("latency_ms", "latency ms", ".3f"), ("test_acc", "test acc", ".4f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
