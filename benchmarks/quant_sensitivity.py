"""How well the mismatch model ranks real quantization drops (thesis §14.1, after HAWQ-V2).

From a run whose phase 1 is done, the space is re-bound with ``--bits`` (8 and 4 by default; the
phase-1 weights are float and serve every bit-width). For every (block, operator) the benchmark
measures the proxy-accuracy drop of the operator quantized inside the teacher at 8 and at 4 bits,
fits the model drop = λ·mismatch on all measured drops (as phase 2 does), and reports, per
bit-width, the Spearman correlation between the mismatch and the measured drops (λ > 0 leaves the
ranking unchanged) and the model's mean error in points.

    python -m benchmarks.quant_sensitivity runs/digits
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from scipy import stats

from eta.bound import bind
from eta.mixed_precision import quantization_terms
from eta.pareto import format_table
from eta.phases.pretrain import load_block_states
from eta.space import parse_space
from eta.student import OperatorBank

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.quant_sensitivity")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    args = ap.parse_args(argv)
    setup_logging()

    search, _, _, _ = load_solved_run(args.run)
    d = search.space.to_dict()
    d["bits"] = sorted(set([32, *args.bits]), reverse=True)
    bound = bind(parse_space(d, "benchmark"), search.splits)
    bound.load_teacher_weights(search.teacher_path)
    bank = OperatorBank(bound, load_block_states(search.run, bound), where=search.run.pretrain_dir)
    terms = quantization_terms(bound, bank, search.splits, measure_bits=tuple(args.bits))
    rows = [r for opts in terms["rows"] for r in opts if r]
    out = []
    for bits in args.bits:
        rs = [r for r in rows if r["bits"] == bits]
        measured = np.array([r["measured_drop"] for r in rs])
        omega = np.array([r["omega"] for r in rs])
        modelled = np.array([r["modelled_drop"] for r in rs])
        out.append({"bits": bits, "n": len(rs), "mean_drop": 100 * measured.mean(), "max_drop": 100 * measured.max(),
                    "rho_omega": stats.spearmanr(omega, measured)[0], "rho_model": stats.spearmanr(modelled, measured)[0],
                    "mae": 100 * np.abs(modelled - measured).mean()})
    print(f"\n{search.run.root.name}: {len(rows) // len(args.bits)} (block, operator) pairs quantized inside the teacher; "
          f"model drop = {terms['lambda']:.3g} x mismatch, fitted on the drops at bits {terms['fitted_on_bits']}\n")
    print(format_table(out, [("bits", "bits", "d"), ("n", "operators", "d"), ("mean_drop", "mean drop (points)", ".2f"),
                             ("max_drop", "max drop", ".2f"), ("rho_omega", "Spearman(mismatch, drop)", ".3f"),
                             ("rho_model", "Spearman(model, drop)", ".3f"), ("mae", "model error (points)", ".2f")]))
    return 0


if __name__ == "__main__":
    run_command(main)
