"""Phase 2: sample stitched students, learn to predict their accuracy, solve for the best under budgets.

1. Architectures are sampled at several latency levels (the "Multi" setting of table 14.4),
   stitched from phase-1 operators, their BatchNorm statistics recalibrated, and evaluated on the
   proxy split (never seen in phase 1), in parallel Ray tasks.
2. An MLP on the one-hot encoding learns proxy accuracy; its Spearman correlation is measured
   on held-out sampled architectures.
3. Gekko's APOPT solves max predictor(S) s.t. calibrated Σ table latency ≤ budget for every budget,
   several solutions per budget by excluding earlier ones.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import arch_to_str
from .bound import BoundSpace, bound_with_teacher, splits_for
from .mixed_precision import expand_first_layer, float_projection, is_mixed, project, quantization_terms, quantize_stitched, resource_limits
from .optimize import SearchProblem, sample_under_budget, solve_budgets
from .predictor import MLPPredictor, index_encode, one_hot_encode, spearman, train_predictor
from .runs import Run, read_json, write_json
from .space import parse_space
from .student import OperatorBank, is_quantized
from .train import evaluate, recalibrate_bn

log = logging.getLogger(__name__)


def search_problem(bound: BoundSpace, latency_info: dict, predictor: MLPPredictor | None = None,
                   option_penalty: list | None = None) -> SearchProblem:
    """The solver's problem: calibrated option latencies, the predictor, and (mixed precision) the modelled drops."""
    from .lut import calibration_from, effective_option_ms, option_masks

    cal = latency_info.get("calibration", {"a": 1.0, "b": 0.0})
    identity, integer = option_masks(latency_info["options"])
    per_block = effective_option_ms(latency_info["option_ms"], identity, calibration_from(cal), integer)
    return SearchProblem(
        option_latency=per_block,
        layers=_solver_layers(bound, predictor) if predictor is not None else [],
        option_penalty=[np.asarray(r, float) for r in option_penalty] if option_penalty is not None else None,
        limits=resource_limits(bound),
        activation=predictor.config["activation"] if predictor is not None else "tanh",
        output=predictor.config.get("output", "linear") if predictor is not None else "linear",
        base_latency=float(latency_info["base_ms"]),
        calibration=(float(cal["a"]), float(cal["b"])),
    )


def solve_key(problem: SearchProblem, k_per_budget: int, seed: int) -> str:
    """A digest of everything a budget's solutions depend on, so a resumed phase 2 reuses only what still holds."""
    h = hashlib.sha1(repr((k_per_budget, seed, problem.activation, problem.output, problem.base_latency, tuple(problem.calibration))).encode())
    arrays = [*problem.option_latency, *(a for layer in problem.layers for a in layer), *(problem.option_penalty or [])]
    for values, limit in problem.limits:
        arrays += [*values, np.array([limit])]
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _solver_layers(bound: BoundSpace, predictor: MLPPredictor) -> list:
    """The predictor's weights over every option; bit variants of an operator share its float input."""
    layers = predictor.numpy_layers()
    if not is_mixed(bound):
        return layers
    return expand_first_layer(layers, float_projection(bound)[1])


def float_choices(bound: BoundSpace, choices) -> tuple[int, ...]:
    """The same architecture with every operator at 32 bits (what phase 1 trained and proxy accuracy measures)."""
    return tuple(bound.options[b].index(bound.options[b][j].with_bits(32)) for b, j in enumerate(choices))


def proxy_accuracy(bank: OperatorBank, splits, choices_list, *, seed: int = 0, device="cpu") -> list[float]:
    """Stitch, recalibrate BatchNorm on training batches, evaluate on the proxy split.

    An architecture with bits below 32 is evaluated as it will run: quantized (``quantize_stitched``).
    """
    bound = bank.bound
    cfg = bound.space
    accs = []
    for choices in choices_list:
        arch = bound.arch(choices)
        student = bank.stitch(arch).to(device)
        if is_quantized(arch):
            from .quant import one_thread

            with one_thread():
                student = quantize_stitched(bound, student, arch, splits, device=device)
                accs.append(evaluate(student, splits.proxy, resolution=cfg.data.resolution, device=device))
            continue
        recalibrate_bn(student, splits.train, resolution=cfg.data.resolution, num_batches_=cfg.phase2.bn_batches, batch_size=cfg.data.batch_size, seed=seed, device=device)
        accs.append(evaluate(student, splits.proxy, resolution=cfg.data.resolution, device=device))
    return accs


def _remote_proxy_accuracy(space_dict, teacher_state, block_states, choices_list, seed, fault=None):
    from .faults import maybe_die

    torch.set_num_threads(1)
    space = parse_space(space_dict)
    splits = splits_for(space)
    bound = bound_with_teacher(space, splits, teacher_state)
    bank = OperatorBank.from_states(bound, block_states)
    accs = proxy_accuracy(bank, splits, choices_list, seed=seed)
    maybe_die("solve", f"{len(choices_list)} students from {arch_to_str(bound.arch(choices_list[0]))}", fault)
    return accs


def sample_architectures(bound: BoundSpace, problem: SearchProblem, n: int, levels: int, seed: int) -> list[tuple]:
    """``n`` distinct architectures spread evenly over ``levels`` latency bands.

    A band no architecture reaches (the slow end of a mixed-precision space under a size limit,
    say) hands its share to the bands that filled theirs, so the predictor still sees ``n`` samples.
    """
    rng = np.random.default_rng(seed)
    lo, hi = problem.min_latency(), problem.max_latency()
    edges = np.linspace(lo, hi, levels + 1)
    out, seen = [], set()
    tc = bound.teacher_choices()
    want = [n // levels + (1 if i < n % levels else 0) for i in range(levels)]
    bands = list(range(levels))
    while bands:
        filled = []
        for i in bands:
            got = sample_under_budget(problem, float(edges[i + 1]) + 1e-9, want[i], rng, lower_ms=float(edges[i]))
            for c in got:
                c = tuple(int(v) for v in c)
                if c not in seen and c != tc:
                    seen.add(c)
                    out.append(c)
                    want[i] -= 1
            if want[i] <= 0:
                filled.append(i)
        short = n - len(out)
        if short <= 0 or not filled:
            break
        bands = filled
        for k, i in enumerate(filled):
            want[i] = short // len(filled) + (1 if k < short % len(filled) else 0)
    if len(out) < n:
        log.info("phase 2: %d distinct architectures sampled of the %d asked (the space or its limits allow no more)", len(out), n)
    return out[:n]


def evaluate_samples(run: Run, bound: BoundSpace, block_states: list[dict], choices_list: list[tuple], progress=True) -> list[dict]:
    """Proxy accuracy of each architecture, in parallel Ray tasks; finished chunks survive a crash."""
    import ray

    from .raycluster import cpu_slots

    path = run.dir("phase2") / "samples.json"
    done = {tuple(s["choices"]): s for s in (read_json(path) if path.exists() else [])}
    todo = [c for c in choices_list if c not in done]
    if done:
        log.info("phase 2: %d of %d sampled students already evaluated, %d to evaluate", len(choices_list) - len(todo), len(choices_list), len(todo))
    if todo:
        from . import faults

        n_tasks = bound.space.phase2.eval_tasks or cpu_slots(1)
        chunk = max(1, min(25, int(np.ceil(len(todo) / n_tasks))))
        chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
        teacher_ref = ray.put({k: v.cpu() for k, v in bound.teacher.state_dict().items()})
        states_ref = ray.put(block_states)
        task = ray.remote(_remote_proxy_accuracy).options(num_cpus=1, max_retries=3)
        fault = faults.spec()
        refs = {task.remote(bound.space.to_dict(), teacher_ref, states_ref, ch, bound.space.seed, fault): ch for ch in chunks}
        bar = tqdm(total=len(todo), desc="phase 2 (proxy accuracy)", disable=not progress, dynamic_ncols=True)
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            accs = ray.get(ready[0])
            for c, acc in zip(refs[ready[0]], accs):
                done[c] = {"choices": list(c), "arch": arch_to_str(bound.arch(c)), "proxy_acc": float(acc)}
            write_json(path, list(done.values()))
            bar.update(len(accs))
        bar.close()
    return [done[c] for c in choices_list]


def encode(bound: BoundSpace, choices_list, encoding: str | None = None) -> np.ndarray:
    """Predictor inputs: the architecture over float operators (bit-widths enter through the penalty)."""
    floats, index = float_projection(bound)
    choices_list = [project(c, index) for c in choices_list]
    sizes = [len(f) for f in floats]
    if (encoding or bound.space.phase2.predictor.encoding) == "index":
        return index_encode(choices_list, sizes)
    return one_hot_encode(choices_list, sizes)


def fit_predictor(bound: BoundSpace, samples: list[dict], seed: int, encoding: str | None = None,
                  output: str | None = None) -> tuple[MLPPredictor, dict]:
    """Train on a seeded split of the samples; report Spearman on the held-out part.

    ``encoding`` and ``output`` override the space's predictor settings (benchmarks compare them).
    """
    cfg = bound.space.phase2
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    n_hold = max(2, int(round(cfg.holdout * len(samples))))
    hold, train = order[:n_hold], order[n_hold:]
    X = encode(bound, [s["choices"] for s in samples], encoding)
    y = np.array([s["proxy_acc"] for s in samples], dtype=np.float64)
    p = cfg.predictor
    model = train_predictor(X[train], y[train], hidden=p.hidden, layers=p.layers, activation=p.activation, output=output or p.output,
                             optimizer=p.optimizer, lr=p.lr, epochs=p.epochs, seed=seed)
    pred = model.predict(X[hold])
    rho = spearman(pred, y[hold])
    metrics = {
        "spearman_holdout": float(rho),
        "n_train": int(len(train)),
        "n_holdout": int(len(hold)),
        "mae_holdout": float(np.mean(np.abs(pred - y[hold]))),
        "proxy_acc_range": [float(y.min()), float(y.max())],
    }
    return model, metrics


def solve_in_parallel(problem: SearchProblem, budgets: list[float], k_per_budget: int, seed: int):
    """Yield (budget, solutions) as each budget is solved: one Ray task per budget when Ray runs, else in turn."""
    import ray

    if len(budgets) <= 1 or not ray.is_initialized():
        for b in budgets:
            yield b, solve_budgets(problem, [b], k_per_budget=k_per_budget, seed=seed)[b]
        return
    task = ray.remote(solve_budgets).options(num_cpus=1, max_retries=2)
    shared = ray.put(problem)
    refs = {task.remote(shared, [b], k_per_budget, seed): b for b in budgets}
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        b = refs[done[0]]
        yield b, ray.get(done[0])[b]


def phase2_choices(bound: BoundSpace, latency_info: dict) -> list[tuple]:
    """The students phase 2 evaluates to train its predictor (deterministic for the space's seed).

    In a mixed space they are float students: bit-widths are priced by the quantization term.
    """
    cfg = bound.space.phase2
    choices = sample_architectures(bound, search_problem(bound, latency_info), cfg.samples, cfg.sample_levels, bound.space.seed)
    if is_mixed(bound):
        choices = list(dict.fromkeys(float_choices(bound, c) for c in choices))
    return choices


def run_phase2(run: Run, bound: BoundSpace, block_states: list[dict], latency_info: dict, budgets_ms: list[float], splits, tracker=None, progress=True) -> dict:
    cfg = bound.space.phase2
    seed = bound.space.seed
    out = run.dir("phase2")
    choices_list = phase2_choices(bound, latency_info)
    mixed = is_mixed(bound)
    t0 = time.time()
    samples = evaluate_samples(run, bound, block_states, choices_list, progress=progress)
    eval_s = time.time() - t0
    predictor, pmetrics = fit_predictor(bound, samples, seed)
    predictor.save(out / "predictor.pt")
    pmetrics["sample_eval_s"] = eval_s
    write_json(out / "predictor.json", pmetrics)
    log.info("predictor: Spearman %.3f on %d held-out architectures", pmetrics["spearman_holdout"], pmetrics["n_holdout"])
    if cfg.predictor.encoding != "one_hot":
        log.info("the solver needs a one-hot predictor; fitting one on the same samples for solving")
        predictor, _ = fit_predictor(bound, samples, seed, encoding="one_hot")
    bank = OperatorBank.from_states(bound, block_states)
    penalty = None
    if mixed:
        qpath = out / "quantization.json"
        qterms = read_json(qpath) if qpath.exists() else None
        if qterms is None:
            qterms = quantization_terms(bound, bank, splits, progress=progress)
            write_json(qpath, qterms)
        penalty = qterms["penalty"]
    problem = search_problem(bound, latency_info, predictor, penalty)
    solved_path, key = out / "solved.json", solve_key(problem, cfg.solutions_per_budget, seed)
    solved = read_json(solved_path) if solved_path.exists() else {}
    if solved.get("key") != key:  # solved with another predictor, latency table or settings
        solved = {"key": key, "budgets": {}}
    budgets = list(dict.fromkeys(float(b) for b in budgets_ms))
    for budget in budgets:
        if repr(budget) in solved["budgets"]:
            log.info("phase 2: budget %.4f ms already solved, keeping its solutions", budget)
    todo = [b for b in budgets if repr(b) not in solved["budgets"]]
    for budget, sols in solve_in_parallel(problem, todo, cfg.solutions_per_budget, seed):
        budget_rows = []
        for rank, sol in enumerate(sols):
            acc = proxy_accuracy(bank, splits, [sol.choices], seed=seed)[0]  # quantized when its bits say so
            budget_rows.append({
                "budget_ms": float(budget),
                "rank": rank,
                "arch": arch_to_str(bound.arch(sol.choices)),
                "choices": [int(c) for c in sol.choices],
                "predicted_acc": float(sol.objective),
                "proxy_acc": float(acc),
                "predicted_latency_ms": float(sol.latency),
                "solver_s": float(sol.wall_s),
                "method": sol.method,
            })
        solved["budgets"][repr(budget)] = budget_rows  # a solved budget survives a crash of the driver
        write_json(solved_path, solved)
    rows = [r for b in budgets for r in solved["budgets"][repr(b)]]
    write_json(out / "solutions.json", rows)
    if tracker is not None:
        tracker.summary(predictor_spearman=pmetrics["spearman_holdout"], samples=len(samples))
        tracker.log({"phase2/predictor_spearman": pmetrics["spearman_holdout"], "phase2/sample_eval_s": eval_s})
        for r in rows:
            tracker.log({"phase2/solver_s": r["solver_s"], "phase2/budget_ms": r["budget_ms"]})
        cols = list(rows[0].keys()) if rows else []
        tracker.table("phase2/solutions", cols, [[str(r[c]) if isinstance(r[c], list) else r[c] for c in cols] for r in rows])
        tracker.table("phase2/samples", ["arch", "proxy_acc"], [[s["arch"], s["proxy_acc"]] for s in samples])
    return {"predictor": pmetrics, "solutions": rows}
