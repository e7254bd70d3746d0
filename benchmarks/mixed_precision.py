"""eta's joint (operator, bit-width) selection against quantizing the teacher, at the same budgets.

From a finished mixed-precision run (a space with ``bits: [32, 8, 4]``, e.g.
``search_spaces/digits_mixed.yaml``), at every budget of the run and under the run's size/BOPs
limits, side by side:

- the teacher quantized uniformly to 8 and to 4 bits (what a post-training quantizer does);
- HAWQV3-style bits-only selection: an exact ILP over the teacher's own blocks at 32/8/4 bits,
  minimising the summed modelled quantization drop (λ·mismatch, HAWQV3's sensitivity objective)
  under the same latency table, calibration and limits;
- eta's joint selection restricted to float operators (what bits add);
- eta's joint selection (the run's phase-2 solution).

Every quantized student is finetuned with the same phase-3 recipe (fake-quantized QAT as Ray Tune
trials of the same run), its test accuracy measured on the held-out split, and its latency
measured end to end as one integer TVM network with the run's backend.

    python -m benchmarks.mixed_precision runs/digits_mixed
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from eta.arch import OpSpec, arch_from_str, arch_to_str
from eta.errors import EtaError
from eta.files import read_json
from eta.optimize import InfeasibleBudget, additive_ilp, solve_inlp
from eta.pareto import format_table
from eta.phases.latency import budgets_ms, network_latency, opened_table
from eta.phases.solve import predictor_problem

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.mixed_precision")


def keep_options(bound, which) -> list[list[int]]:
    """Per block, the option indices whose operator passes ``which`` (at least one per block, or an error)."""
    keep = [[j for j, s in enumerate(opts) if which(s)] for opts in bound.options]
    if any(not k for k in keep):
        raise EtaError("this space offers no such option in some block")
    return keep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args(argv)
    setup_logging()
    from eta.accuracy_predictor import MLPPredictor
    from eta.phases.finetune import finetune_all, student_id
    from eta.space import parse_space

    search, info, _, _ = load_solved_run(args.run)
    bound, space = search.bound, search.space
    qpath = search.run.quantization
    if not qpath.exists():
        raise EtaError(f"{args.run}: no {search.run.relative(qpath)}; this benchmark needs a run whose space has bits below 32")
    penalty = read_json(qpath)["penalty"]
    predictor = MLPPredictor.load(search.run.predictor_weights)
    problem = predictor_problem(bound, info, predictor, penalty)
    budgets = budgets_ms(space, info)
    res = space.data.resolution
    teacher_ms = info.teacher_latency(res)
    limits = {"max_size_mb": space.solve.max_size_mb, "max_gbops": space.solve.max_gbops}

    # what each method returns at each budget: choices, or None where it has no feasible answer
    tc = bound.teacher_choices()
    picks: dict[tuple[str, float], tuple | None] = {}
    own = OpSpec("teacher")  # the teacher's own block, at its own width

    teacher_bits = sorted({s.bits for opts in bound.options for s in opts if s.with_bits(32) == own} - {32}, reverse=True)
    if tc is None or not teacher_bits or any(OpSpec("teacher", bits=b) not in opts for b in teacher_bits for opts in bound.options):
        raise EtaError("this benchmark quantizes the teacher: the pool needs {family: teacher} with integer-lowerable blocks")
    for bits in teacher_bits:
        uniform = tuple(bound.options[b].index(bound.options[b][j].with_bits(bits)) for b, j in enumerate(tc))
        for budget in budgets:
            picks[(f"teacher uniform {bits}-bit", budget)] = uniform
    teacher_only, kept_t = problem.restricted(keep_options(bound, lambda s: s.with_bits(32) == own))
    float_only, kept_f = problem.restricted(keep_options(bound, lambda s: s.bits == 32))
    solved = read_json(search.run.solved)["budgets"]
    for budget in budgets:
        for name, sub, kept, solve in (
            ("bits-only ILP (HAWQV3)", teacher_only, kept_t, lambda p, b: additive_ilp(p.option_penalty, p, b)),
            ("eta, float operators only", float_only, kept_f, lambda p, b: solve_inlp(p, b, seed=space.seed)),
        ):
            try:
                sol = solve(sub, budget)
                picks[(name, budget)] = tuple(int(kept[b][c]) for b, c in enumerate(sol.choices))
            except InfeasibleBudget as err:
                log.info("%s at %.3f ms: %s", name, budget, err)
                picks[(name, budget)] = None
        picks[("eta joint (operators x bits)", budget)] = tuple(solved[repr(float(budget))][0]["choices"])

    archs = list(dict.fromkeys(arch_to_str(bound.arch(c)) for c in picks.values() if c is not None))
    log.info("%d distinct students to finetune (phase-3 trials; finished ones are reused)", len(archs))
    d = space.to_dict()
    d["tracking"]["wandb"] = "disabled"  # the benchmark's trials log nothing to W&B
    ctx = dataclasses.replace(search.ctx, space=parse_space(d, "benchmark"), progress=True)
    with ctx.ray():
        metrics = {m["arch"]: m for m in finetune_all(ctx, archs)}
    with ctx.latency_session():
        measurer, table = opened_table(ctx, info)
        executor = measurer.executor()
        measured = {a: network_latency(bound, table, arch_from_str(a), executor)[str(res)] for a in archs}

    rows = []
    for (method, budget), choices in picks.items():
        row = {"budget": budget, "method": method}
        if choices is None:
            rows.append({**row, "arch": "infeasible"})
            continue
        a = arch_to_str(bound.arch(choices))
        m = metrics[a]
        fits = bool(problem.within_limits_many([choices])[0])
        rows.append({**row, "arch": a, "bits": "/".join(str(s.bits) for s in bound.arch(choices)), "size_mb": m["size_mb"],
                     "table_ms": problem.latency(choices), "measured_ms": measured[a], "test_acc": m["test_acc"][str(res)],
                     "meets_table": "yes" if fits and problem.latency(choices) <= budget + 1e-9 else "no",
                     "meets": "yes" if fits and measured[a] <= budget else "no", "id": student_id(a)})
    rows.sort(key=lambda r: (r["budget"], r["method"]))
    t_acc = search.run.phase_info("teacher")["test_acc"][str(res)]
    print(f"\n{search.run.root.name}: float teacher {teacher_ms:.3f} ms (measured), test accuracy {t_acc:.4f}; limits {limits}; "
          f"latency backend {info.backend} on {info.device}\n")
    print(format_table(rows, [("budget", "budget ms", ".3f"), ("method", "method", "s"), ("bits", "bits per block", "s"),
                              ("size_mb", "MB", ".3f"), ("table_ms", "table ms", ".3f"), ("measured_ms", "measured ms", ".3f"),
                              ("test_acc", "test acc", ".4f"), ("meets_table", "fits (table)", "s"),
                              ("meets", "fits (measured)", "s")]))
    print()
    for r in rows:
        if r.get("id"):
            print(f"{r['budget']:.3f} ms  {r['method']:<32} {r['arch']}")
    return 0


if __name__ == "__main__":
    run_command(main)
