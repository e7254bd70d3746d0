"""Elastic resolution (thesis table 14.5): one student finetuned with and without progressive resolution.

From a finished run: the teacher and the run's most accurate selected student, the student
finetuned twice from the same phase-1 weights with the same epochs, once at the space's base
resolution only and once progressively over every resolution of the space (eta's phase 3), then
all three evaluated on the test split at every resolution, beside the end-to-end latency the
run's table measured at that resolution.

    python -m benchmarks.elastic_resolution runs/digits
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eta.arch import arch_from_str
from eta.pareto import format_table
from eta.train import evaluate, fit

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.elastic_resolution")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--arch", help="student to use (default: the run's most accurate front student)")
    args = ap.parse_args(argv)
    setup_logging()
    from eta.files import read_json
    from eta.phases import latency

    search, info, bank, _ = load_solved_run(args.run)
    bound, space = search.bound, search.space
    cfg, res = space.finetune, space.data.resolution
    pareto = read_json(search.run.pareto_json)
    arch = arch_from_str(args.arch or max(pareto["front"], key=lambda p: p["test_acc"])["arch"])
    with search.ctx.latency_session():
        m, table = latency.opened_table(search.ctx, info)
        student_ms = latency.network_latency(bound, table, arch, m.executor(), m)
    teacher_ms = info.teacher_ms
    rows = {r: {"resolution": r, "teacher_ms": teacher_ms[str(r)], "student_ms": student_ms[str(r)],
                "teacher": evaluate(bound.teacher, search.splits.test, resolution=r)} for r in space.resolutions}
    for label, resolutions in (("fixed", [res]), ("progressive", space.resolutions)):
        student = bank.stitch(arch)
        log.info("finetuning %s (%s resolution: %s)", "-".join(map(str, arch)), label, resolutions)
        fit(student, search.splits.train, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            resolutions=resolutions, teacher=bound.teacher, kd_weight=cfg.kd_weight, temperature=cfg.temperature,
            seed=space.seed, progress=False)
        for r in space.resolutions:
            rows[r][label] = evaluate(student, search.splits.test, resolution=r)
    print(f"\n{search.run.root.name}: student {'-'.join(map(str, arch))}, {cfg.epochs} finetune epochs each; "
          f"latency end to end ({info.backend}, {info.device})\n")
    print(format_table(list(rows.values()), [("resolution", "res", "d"), ("teacher_ms", "teacher ms", ".3f"), ("teacher", "teacher acc", ".4f"),
                                             ("student_ms", "student ms", ".3f"), ("fixed", f"student, {res}px only", ".4f"),
                                             ("progressive", "student, progressive", ".4f")]))
    return 0


if __name__ == "__main__":
    run_command(main)
