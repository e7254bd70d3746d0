"""TVM against PyTorch latency for the teacher and three students of a space, side by side in one run.

Every network is measured whole, with the same protocol (warm-up, median of repeats, spread), by
each backend: TVM with its untuned schedules, optionally TVM after MetaSchedule tuning
(``--tune-trials``, database in ``--work``), PyTorch eager and ``torch.compile``. The students are
the fastest one the space's table allows and two random ones; weights do not change latency, so
the networks are not trained.

    python -m benchmarks.latency_backends --space search_spaces/fashion_mnist_quick.yaml
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from eta import families
from eta.arch import arch_to_str
from eta.errors import EtaError
from eta.latency import torch_backend, tvm_backend
from eta.pareto import format_table

from eta.student import skeleton

from .common import load_bound_space, run_command

log = logging.getLogger("benchmarks.latency_backends")


def pick_students(bound, seed: int = 0) -> list[tuple[str, tuple]]:
    """The cheapest student by parameter count (a table-free proxy for 'fastest') and two random ones."""
    rng = np.random.default_rng(seed)
    choose_small = tuple(int(np.argmin([_params(bound, b, o) for o in opts])) for b, opts in enumerate(bound.options))
    out = [("smallest student", choose_small)]
    while len(out) < 3:
        c = tuple(int(rng.integers(k)) for k in bound.options_per_block)
        if c not in [x for _, x in out]:
            out.append((f"random student {len(out)}", c))
    return out


def _params(bound, block, spec) -> int:
    """Parameters of one option of ``block``, built standalone (an identity has none)."""
    return 0 if not families.get(spec.family).costs_latency else sum(p.numel() for p in bound.operator(block, spec).parameters())


def measure_all(model, shape, target, protocol, tune_trials: int, work: Path) -> dict:
    out = {"tvm_ms": tvm_backend.measure(model, shape, target, protocol).median_ms}
    if tune_trials:
        db = work / "tvm-db"
        tvm_backend.tune(model, shape, target, db, tune_trials)
        out["tvm_tuned_ms"] = tvm_backend.measure(model, shape, target, protocol, database_dir=db).median_ms
    out["eager_ms"] = torch_backend.measure(model, shape, "cpu", protocol).median_ms
    try:
        out["compile_ms"] = torch_backend.measure(model, shape, "cpu", protocol, compile=True).median_ms
    except EtaError as err:
        log.warning("%s", err)
        out["compile_ms"] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/digits.yaml")
    ap.add_argument("--tune-trials", type=int, default=0, help="also tune each network with MetaSchedule (trials per workload)")
    ap.add_argument("--work", default="runs/bench-latency-backends")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    space, bound, measurer = load_bound_space(args.space)
    cfg, protocol, target = space.latency, measurer.protocol, measurer.target
    shape = bound.input_shape(batch=cfg.batch_size)
    nets = [("teacher", "the teacher", bound.teacher)]
    nets += [(name, arch_to_str(bound.arch(c)), skeleton(bound, bound.arch(c))) for name, c in pick_students(bound, args.seed)]
    rows = []
    for name, arch, model in nets:
        log.info("measuring %s", name)
        r = {"model": name, "arch": arch, **measure_all(model.eval(), shape, target, protocol, args.tune_trials, Path(args.work))}
        r["best"] = min((k for k in r if k.endswith("_ms") and r[k] is not None), key=lambda k: r[k]).removesuffix("_ms")
        rows.append(r)
    cols = [("model", "network", "s"), ("tvm_ms", "TVM untuned ms", ".3f")]
    if args.tune_trials:
        cols.append(("tvm_tuned_ms", f"TVM tuned ({args.tune_trials}) ms", ".3f"))
    cols += [("eager_ms", "torch eager ms", ".3f"), ("compile_ms", "torch.compile ms", ".3f"), ("best", "fastest", "s"), ("arch", "architecture", "s")]
    print(f"\n{space.name}: batch {cfg.batch_size}, input {tuple(shape)}, {tvm_backend.device_name(target)} "
          f"({target.get('mcpu')}, {target.get('num-cores')} cores)\n")
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    run_command(main)
