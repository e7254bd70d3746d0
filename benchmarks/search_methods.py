"""Search methods on the same predictor and latency table (thesis table 14.3), side by side in one run.

For every budget of a finished run (phases 1 and 2 done): Gekko INLP; HANT's additive ILP, whose
per-block accuracy drops are measured by swapping one block of the teacher at a time and taking
its proxy accuracy; predictor-ranked random sampling with k = 50, 100, 500; evolution (population
100, as once-for-all); random sampling and evolution restarted until they have used 10× the
INLP's time; and exhaustive enumeration where the space is small enough. Columns: wall time,
predicted accuracy, proxy accuracy (stitched, BatchNorm recalibrated) and, for one budget, the test
accuracy of each method's solution after phase-3 finetuning.

    python -m benchmarks.search_methods runs/digits --finetune
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from eta.arch import arch_to_str
from eta.errors import EtaError
from eta.optimize import additive_ilp, evolutionary, exhaustive, random_search, solve_inlp
from eta.pareto import format_table

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.search_methods")


def hant_drops(search, bank) -> tuple[list[np.ndarray], float]:
    """Proxy-accuracy drop of each option, swapped alone into the teacher (HANT eq. 14.5); and the time it took."""
    from eta.phases.solve import proxy_accuracy

    bound = search.bound
    teacher = bound.teacher_choices()
    if teacher is None:
        raise EtaError("the additive ILP swaps blocks into the teacher: the pool needs the 'teacher' operator")
    t0 = time.time()
    base = proxy_accuracy(bank, search.splits, [teacher], seed=bound.space.seed)[0]
    swaps = [(b, j) for b, k in enumerate(bound.options_per_block) for j in range(k) if j != teacher[b]]
    accs = proxy_accuracy(bank, search.splits, [tuple(j if i == b else t for i, t in enumerate(teacher)) for b, j in swaps],
                          seed=bound.space.seed)
    drops = [np.zeros(k) for k in bound.options_per_block]
    for (b, j), a in zip(swaps, accs):
        drops[b][j] = base - a
    return drops, time.time() - t0


def restarted(method, problem, budget, seconds: float, label: str, seed: int = 0):
    """Run ``method`` with new seeds until ``seconds`` have passed; keep the best solution."""
    t0, best, i = time.time(), None, 0
    while time.time() - t0 < seconds or best is None:
        sol = method(problem, budget, seed=seed + i)
        best = sol if best is None or sol.objective > best.objective else best
        i += 1
    best.wall_s, best.method = time.time() - t0, f"{label} ({i} restarts)"
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--finetune", action="store_true", help="finetune each method's solution at --finetune-budget and report test accuracy")
    ap.add_argument("--finetune-budget", type=int, default=1, help="index of the budget whose solutions are finetuned")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging()
    from eta.phases.latency import budgets_ms
    from eta.phases.solve import proxy_accuracy

    search, info, bank, problem = load_solved_run(args.run)
    budgets = budgets_ms(search.space, info)
    bound = search.bound
    drops, hant_s = hant_drops(search, bank)
    log.info("HANT: %d single-block swaps evaluated in %.1f s", sum(bound.options_per_block) - bound.num_blocks, hant_s)
    space_size = int(np.prod(problem.sizes, dtype=np.float64))
    rows = []
    for bi, budget in enumerate(budgets):
        sols = [solve_inlp(problem, budget, seed=args.seed)]
        ten_x = 10 * sols[0].wall_s
        sols.append(additive_ilp(drops, problem, budget))
        sols += [random_search(problem, budget, k, seed=args.seed) for k in (50, 100, 500)]
        sols.append(evolutionary(problem, budget, population=100, generations=30, seed=args.seed))
        sols.append(restarted(lambda p, b, seed: random_search(p, b, 500, seed=seed), problem, budget, ten_x, "random, 10x INLP time"))
        sols.append(restarted(lambda p, b, seed: evolutionary(p, b, 100, 30, seed=seed), problem, budget, ten_x, "evolution, 10x INLP time"))
        if space_size <= 5_000_000:
            sols.append(exhaustive(problem, budget, max_combinations=5_000_000))
        proxies = proxy_accuracy(bank, search.splits, [s.choices for s in sols], seed=bound.space.seed)
        for s, proxy in zip(sols, proxies):
            rows.append({"budget_i": bi, "budget": budget, "method": s.method, "wall": s.wall_s, "predicted": s.objective,
                         "proxy": proxy, "latency": s.latency, "arch": arch_to_str(bound.arch(s.choices)), "choices": s.choices})
    if args.finetune:
        from eta.phases.finetune import finetune_student

        res = str(bound.space.data.resolution)
        picked = [r for r in rows if r["budget_i"] == args.finetune_budget]
        cache = {}
        for r in picked:
            if r["choices"] not in cache:
                log.info("finetuning %s", r["arch"])
                _, _, accs = finetune_student(bound, bank, search.splits, bound.arch(r["choices"]))
                cache[r["choices"]] = float(accs[int(res)])
            r["final"] = cache[r["choices"]]
    print(f"\n{search.run.root.name}: {space_size:,} architectures, {len(budgets)} budgets; "
          f"HANT's per-block drops took {hant_s:.1f} s to measure (not in its wall time below)\n")
    cols = [("budget", "budget ms", ".3f"), ("method", "method", "s"), ("wall", "wall s", ".2f"), ("predicted", "predicted", ".4f"),
            ("proxy", "proxy acc", ".4f"), ("latency", "latency ms", ".3f")]
    if args.finetune:
        cols.append(("final", "final test acc", ".4f"))
    print(format_table(rows, cols + [("arch", "architecture", "s")]))
    exact = {r["budget_i"]: r["predicted"] for r in rows if r["method"] == "exhaustive"}
    inlp = {r["budget_i"]: r["predicted"] for r in rows if r["method"].startswith("inlp")}
    if exact:
        gaps = [100 * (exact[b] - inlp[b]) / exact[b] for b in exact]
        print("\nINLP gap to the exhaustive optimum (predicted accuracy): " + ", ".join(f"{g:.2f} %" for g in gaps))
    return 0


if __name__ == "__main__":
    run_command(main)
