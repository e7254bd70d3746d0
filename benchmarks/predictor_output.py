"""A linear against a sigmoid predictor output, on one solved run: what each promises the solver's students, and what they deliver.

For each output the predictor is fit on the run's own phase-2 students (the same sample list, split
and seed as phase 2), scored by Spearman on the held-out ones, and handed to the same solver, with
the run's quantization term where it has one, at every budget of the run. The student chosen at
each budget is then evaluated on the proxy split as phase 2 evaluates it (quantized when its bits
say so). "promised" is the solver's objective (predicted accuracy minus any modelled quantization
drop); "over-promise" is promised minus measured. ``--seeds`` repeats it with other predictor
seeds (split and initialisation) and prints the mean per output and budget.

    python -m benchmarks.predictor_output runs/digits_mixed
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from eta.errors import EtaError
from eta.files import read_json
from eta.pareto import format_table

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.predictor_output")


def phase2_samples(search, info) -> list[dict]:
    """The students phase 2 trained its predictor on, read back from the run's cache."""
    from eta.phases.latency import search_problem
    from eta.phases.solve import sampled_choices

    choices = sampled_choices(search.bound, search_problem(search.bound, info))
    cached = {tuple(s["choices"]): s for s in read_json(search.run.samples)}
    missing = [c for c in choices if c not in cached]
    if missing:
        raise EtaError(f"{search.run.root}: {len(missing)} of phase 2's {len(choices)} students are not in "
                       f"{search.run.relative(search.run.samples)}; run 'eta solve {search.run.root} --rerun' first")
    return [cached[c] for c in choices]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--outputs", nargs="+", default=["linear", "sigmoid"], choices=["linear", "sigmoid"])
    ap.add_argument("--seeds", type=int, default=1, help="predictor seeds (the run's seed and the ones after it)")
    args = ap.parse_args(argv)
    setup_logging()
    from eta.arch import arch_to_str
    from eta.optimize import solve_budgets
    from eta.phases.latency import budgets_ms
    from eta.phases.solve import fit_predictor, predictor_problem, proxy_accuracy

    search, info, bank, _ = load_solved_run(args.run)
    bound, seed = search.bound, search.space.seed
    samples = phase2_samples(search, info)
    qpath = search.run.quantization
    penalty = read_json(qpath)["penalty"] if qpath.exists() else None
    splits = search.splits
    budgets = budgets_ms(search.space, info)
    rows = []
    measured = {}  # the same student is evaluated once
    for output in args.outputs:
        for s in range(seed, seed + args.seeds):
            predictor, metrics = fit_predictor(bound, samples, s, output=output)
            problem = predictor_problem(bound, info, predictor, penalty)
            for budget in budgets:
                sol = solve_budgets(problem, [budget], k_per_budget=1, seed=seed)[budget][0]
                if sol.choices not in measured:
                    measured[sol.choices] = proxy_accuracy(bank, splits, [sol.choices], seed=seed)[0]
                acc = measured[sol.choices]
                rows.append({"output": output, "seed": s, "rho": metrics["spearman_holdout"], "mae": metrics["mae_holdout"],
                             "budget": budget, "arch": arch_to_str(bound.arch(sol.choices)), "latency": sol.latency,
                             "promised": sol.objective, "proxy": acc, "gap": sol.objective - acc})
                log.info("%s output, seed %d, budget %.3f ms: promised %.4f, proxy accuracy %.4f", output, s, budget, sol.objective, acc)
    print(f"\n{search.run.root.name}: predictor fit on {len(samples)} phase-2 students (held-out share {search.space.solve.holdout}); "
          f"the solver's student at each budget, measured on the proxy split\n")
    print(format_table(rows, [("output", "output", "s"), ("seed", "seed", "d"), ("rho", "Spearman", ".3f"), ("mae", "MAE", ".4f"), ("budget", "budget ms", ".3f"),
                              ("latency", "table ms", ".3f"), ("promised", "promised", ".4f"), ("proxy", "proxy acc", ".4f"),
                              ("gap", "over-promise", "+.4f"), ("arch", "architecture", "s")]))
    if args.seeds > 1:
        means = []
        for output in args.outputs:
            for budget in budgets:
                sel = [r for r in rows if r["output"] == output and r["budget"] == budget]
                means.append({"output": output, "budget": budget, "rho": np.mean([r["rho"] for r in sel]),
                              "promised": np.mean([r["promised"] for r in sel]), "proxy": np.mean([r["proxy"] for r in sel]),
                              "gap": np.mean([r["gap"] for r in sel])})
        print(f"\nmean over {args.seeds} predictor seeds\n")
        print(format_table(means, [("output", "output", "s"), ("budget", "budget ms", ".3f"), ("rho", "Spearman", ".3f"),
                                   ("promised", "promised", ".4f"), ("proxy", "proxy acc", ".4f"), ("gap", "over-promise", "+.4f")]))
    return 0


if __name__ == "__main__":
    run_command(main)
