"""Run-to-run noise of the measurement protocol: the same operators compiled and timed again and again.

For a sample of a space's table entries, each operator is compiled afresh and measured ``--runs``
times with the space's protocol. Reported per operator: the within-run spread the table records
(IQR / median of the repeats) and the run-to-run coefficient of variation of the medians, which
is what a table built on another day would differ by.

    python -m benchmarks.latency_noise --space search_spaces/digits.yaml --entries 12 --runs 5
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

from eta.latency import tvm_backend
from eta.pareto import format_table
from eta.phases.latency import space_workloads

from .common import load_bound_space, run_command

log = logging.getLogger("benchmarks.latency_noise")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/digits.yaml")
    ap.add_argument("--entries", type=int, default=12)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    space, bound, measurer = load_bound_space(args.space)
    protocol, target = measurer.protocol, measurer.target
    items = [w for w in space_workloads(bound) if w.bits == 32]
    pick = np.random.default_rng(args.seed).choice(len(items), size=min(args.entries, len(items)), replace=False)
    rows = []
    for i in sorted(pick):
        sig, factory, shape = items[i].signature, items[i].factory, items[i].input_shape
        runs = [tvm_backend.measure(factory(), shape, target, protocol) for _ in range(args.runs)]
        med = np.array([m.median_ms for m in runs])
        rows.append({"op": sig.split("#")[0], "shape": "x".join(map(str, shape[1:])), "ms": float(np.median(med)),
                     "spread": 100 * float(np.median([m.spread for m in runs])), "cv": 100 * float(med.std(ddof=1) / med.mean()),
                     "range": 100 * float(np.ptp(med) / np.median(med))})
    print(f"\n{space.name}: {len(rows)} operators, each compiled and timed {args.runs} times ({tvm_backend.device_name(target)})\n")
    print(format_table(rows, [("op", "operator", "s"), ("shape", "input", "s"), ("ms", "median ms", ".4f"),
                              ("spread", "within-run spread %", ".2f"), ("cv", "run-to-run CV %", ".2f"), ("range", "max-min %", ".1f")]))
    cvs = np.array([r["cv"] for r in rows])
    print(f"\nrun-to-run CV: median {np.median(cvs):.2f}%, worst {cvs.max():.2f}%")
    return 0


if __name__ == "__main__":
    run_command(main)
