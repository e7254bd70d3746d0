"""The accuracy predictor's design choices (thesis table 14.4), each measured on the same held-out students.

From a run whose phase 1 is done, architectures are sampled, stitched and evaluated on the proxy
split (BatchNorm recalibrated), in parallel Ray tasks, and cached in ``<run>/bench/`` so re-runs
only train predictors. Every predictor is scored by Spearman's rank correlation on the same
held-out students spread over the whole latency range. Varied one at a time around the default
(1000 training students over multiple latency levels, Adam, one-hot, MLP): training-set size
100 / 1000 / 2000, students from one latency band versus many, SGD versus Adam, one-hot versus
index encoding, a linear versus a sigmoid output (fit on logit accuracy), and the MLP versus
scikit-learn's SVR (HAO's choice), ridge regression and gradient boosting on the same features.
For every MLP, "max pred" is the predictor's own maximum over the whole space (found by the
solver's evolutionary search with no latency limit), to set beside the best proxy accuracy
measured: how far the predictor promises past anything it has seen.

    python -m benchmarks.predictor_ablation runs/digits
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from eta.accuracy_predictor import index_encode, one_hot_encode, spearman, train_predictor
from eta.files import read_json, write_json
from eta.pareto import format_table

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.predictor_ablation")


def evaluate_cached(search, choices: list[tuple], cache: Path) -> dict:
    """Proxy accuracy of each architecture (Ray tasks of 25), cached in ``cache`` as it arrives."""
    from eta.phases.pretrain import load_block_states
    from eta.phases.solve import proxy_accuracy_task
    from eta.raycluster import Task, completed

    done = {tuple(s[0]): s[1] for s in (read_json(cache) if cache.exists() else [])}
    todo = [c for c in dict.fromkeys(choices) if c not in done]
    if todo:
        bound = search.bound
        with search.ctx.ray() as ray:
            teacher = ray.put({k: v.cpu() for k, v in bound.teacher.state_dict().items()})
            states = ray.put(load_block_states(search.run, bound))
            task = Task(proxy_accuracy_task, threads=1, num_cpus=1, num_gpus=bound.space.solve.num_gpus, max_retries=3)
            chunks = [todo[i:i + 25] for i in range(0, len(todo), 25)]
            refs = {task.submit(bound.space.to_dict(), teacher, states, ch, bound.space.seed): ch for ch in chunks}
            n_done, t0 = 0, time.time()
            for ref, accs in completed(list(refs), desc="proxy accuracy", total=len(todo), progress=False, count=len):
                for c, acc in zip(refs[ref], accs):
                    done[c] = float(acc)
                n_done += len(refs[ref])
                write_json(cache, [[list(c), a] for c, a in done.items()])
                log.info("proxy accuracy: %d/%d students (%.0f s)", n_done, len(todo), time.time() - t0)
    return done


def sklearn_model(name: str, seed: int):
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    return {"svr": lambda: make_pipeline(StandardScaler(with_mean=False), SVR(C=1.0, epsilon=0.005)),
            "ridge": lambda: RidgeCV(alphas=np.logspace(-3, 3, 13)),
            "gbr": lambda: GradientBoostingRegressor(n_estimators=300, max_depth=3, learning_rate=0.05, random_state=seed)}[name]()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 2000])
    ap.add_argument("--default-size", type=int, default=1000)
    ap.add_argument("--holdout", type=int, default=200)
    ap.add_argument("--levels", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3, help="predictor seeds averaged per row")
    args = ap.parse_args(argv)
    setup_logging()
    from eta.optimize import evolutionary, sample_under_budget
    from eta.phases.latency import budgets_ms
    from eta.phases.solve import sample_architectures

    search, info, _, problem = load_solved_run(args.run)
    bound, seed = search.bound, search.space.seed
    cfg = search.space.solve.predictor
    n_max = max(args.sizes + [args.default_size])
    held = sample_architectures(problem, args.holdout, args.levels, seed + 101, exclude=bound.teacher_choices())
    multi = [c for c in sample_architectures(problem, n_max + args.holdout, args.levels, seed + 202, exclude=bound.teacher_choices()) if c not in set(held)][:n_max]
    budgets = budgets_ms(search.space, info)
    budget = budgets[len(budgets) // 2]
    band = (budget * 0.9, budget)  # one budget: students just under it, as a single-budget search would sample
    single = [c for c in sample_under_budget(problem, band[1], args.default_size + args.holdout, np.random.default_rng(seed + 303),
                                             lower_ms=band[0]) if c not in set(held)][:args.default_size]
    acc = evaluate_cached(search, held + multi + single, search.run.benchmarks_dir / "predictor_samples.json")
    y = lambda cs: np.array([acc[c] for c in cs])  # noqa: E731

    def encode(cs, enc):
        return (one_hot_encode if enc == "one_hot" else index_encode)(cs, bound.options_per_block)

    def predicted_max(m) -> float:
        """The predictor's maximum over the space: evolution with no latency limit (one-hot MLPs only)."""
        free = dataclasses.replace(problem, layers=m.numpy_layers(), activation=m.config["activation"],
                                   output=m.config["output"], option_penalty=None, limits=())
        return evolutionary(free, free.max_latency(), seed=seed).objective

    def score(train, *, model="mlp", enc="one_hot", optimizer=cfg.optimizer, output=cfg.output):
        rhos, tops, t0 = [], [], time.time()
        for s in range(args.seeds):
            X, Xh = encode(train, enc), encode(held, enc)
            if model == "mlp":
                m = train_predictor(X, y(train), hidden=cfg.hidden, layers=cfg.layers, activation=cfg.activation, output=output,
                                    optimizer=optimizer, lr=cfg.lr, epochs=cfg.epochs, seed=seed + s)
                pred = m.predict(Xh)
                if enc == "one_hot":
                    tops.append(predicted_max(m))
            else:
                pred = sklearn_model(model, seed + s).fit(X, y(train)).predict(Xh)
            rhos.append(spearman(pred, y(held)))
        return float(np.mean(rhos)), float(np.std(rhos)), (time.time() - t0) / args.seeds, (float(np.mean(tops)) if tops else None)

    default = multi[:args.default_size]
    rows = []

    def add(factor, setting, train, **kw):
        rho, sd, fit_s, top = score(train, **kw)
        rows.append({"factor": factor, "setting": setting, "n": len(train), "rho": rho, "sd": sd, "fit_s": fit_s,
                     "max_pred": top})
        log.info("%s %s: Spearman %.3f", factor, setting, rho)

    add("default", f"MLP, one-hot, {cfg.optimizer}, {cfg.output} output, {args.levels} latency levels", default)
    for n in args.sizes:
        if n != args.default_size:
            add("training set", f"{n} students", multi[:n])
    add("budgets", f"one budget ({band[0]:.2f}-{band[1]:.2f} ms)", single)
    add("optimizer", "sgd" if cfg.optimizer == "adam" else "adam", default, optimizer="sgd" if cfg.optimizer == "adam" else "adam")
    add("encoding", "index", default, enc="index")
    other = "linear" if cfg.output == "sigmoid" else "sigmoid"
    add("output", other, default, output=other)
    for name, label in (("svr", "SVR (HAO)"), ("ridge", "ridge"), ("gbr", "gradient boosting")):
        add("model", label, default, model=name)
    print(f"\n{search.run.root.name}: Spearman on {len(held)} held-out students over the whole latency range "
          f"(proxy accuracy {y(held).min():.3f}-{y(held).max():.3f}; best measured of all {len(acc)}: {max(acc.values()):.4f}), "
          f"mean ± std over {args.seeds} predictor seeds\n")
    print(format_table(rows, [("factor", "factor", "s"), ("setting", "setting", "s"), ("n", "train", "d"), ("rho", "Spearman", ".3f"),
                              ("sd", "±", ".3f"), ("max_pred", "max pred", ".4f"), ("fit_s", "fit s", ".1f")]))
    return 0


if __name__ == "__main__":
    run_command(main)
