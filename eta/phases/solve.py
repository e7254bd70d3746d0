"""Phase ``solve``: sample stitched students, learn to predict their accuracy, solve for the best under budgets.

1. Architectures are sampled at several latency levels (the "Multi" setting of table 14.4),
   stitched from pretrained operators, their BatchNorm statistics recalibrated, and evaluated on
   the proxy split (never seen in pretraining), in parallel Ray tasks.
2. An MLP on the one-hot encoding learns proxy accuracy; its Spearman correlation is measured on
   held-out sampled architectures.
3. Gekko's APOPT solves max predictor(S) s.t. calibrated latency ≤ budget for every budget,
   several solutions per budget by excluding earlier ones (in mixed precision the predictor minus
   the modelled quantization drop).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace

import numpy as np

from .. import faults
from ..accuracy_predictor import MLPPredictor, index_encode, one_hot_encode, spearman, train_predictor
from ..arch import arch_to_str
from ..bound import BoundSpace, rebuild
from ..devices import pick_device
from ..errors import EtaError, first_line
from ..files import read_json, write_json
from ..mixed_precision import expand_first_layer, float_projection, is_mixed, project, quantization_terms, quantize_stitched
from ..optimize import SearchProblem, sample_under_budget, solve_budgets
from ..raycluster import Task, completed, cpu_slots
from ..records import LatencyInfo, SolutionRow
from ..student import OperatorBank, is_quantized
from ..threads import torch_threads
from ..train import evaluate, recalibrate_bn
from . import latency
from .context import PhaseContext

log = logging.getLogger(__name__)

NAME = "solve"


def predictor_problem(bound: BoundSpace, info: LatencyInfo, predictor: MLPPredictor, option_penalty: list | None = None) -> SearchProblem:
    """The solver's problem with the accuracy predictor; bit variants of an operator share its float input."""
    layers = predictor.numpy_layers()
    if is_mixed(bound):
        layers = expand_first_layer(layers, float_projection(bound)[1])
    return latency.search_problem(bound, info, layers, activation=predictor.config["activation"],
                                  output=predictor.config.get("output", "linear"), option_penalty=option_penalty)


def solve_key(problem: SearchProblem, k_per_budget: int, seed: int, each_width: bool = False) -> str:
    """A digest of everything a budget's solutions depend on, so a resumed solve reuses only what still holds."""
    h = hashlib.sha1(repr((k_per_budget, seed, problem.activation, problem.output, problem.base_latency)
                          + (("each_width",) if each_width else ())).encode())
    arrays = [*problem.option_latency, *(a for layer in problem.layers for a in layer), *(problem.option_penalty or [])]
    for values, limit in problem.limits:
        arrays += [*values, np.array([limit])]
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


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
            with torch_threads(1):
                student = quantize_stitched(bound, student, arch, splits, device=device)
                accs.append(evaluate(student, splits.proxy, resolution=cfg.data.resolution, device=device))
            continue
        recalibrate_bn(student, splits.train, resolution=cfg.data.resolution, num_batches_=cfg.solve.bn_batches,
                       batch_size=cfg.data.batch_size, seed=seed, device=device)
        accs.append(evaluate(student, splits.proxy, resolution=cfg.data.resolution, device=device))
    return accs


def proxy_accuracy_task(space_dict, teacher_state, block_states, choices_list, seed) -> list[float]:
    """Ray task body: the proxy accuracy of a chunk of sampled students, rebuilt from plain data."""
    bound, splits = rebuild(space_dict, teacher_state)
    bank = OperatorBank(bound, block_states)
    device = pick_device(bound.space.solve.num_gpus)
    accs = proxy_accuracy(bank, splits, choices_list, seed=seed, device=device)
    faults.maybe_die(NAME, f"{len(choices_list)} students from {arch_to_str(bound.arch(choices_list[0]))}")
    return accs


def sample_architectures(problem: SearchProblem, n: int, levels: int, seed: int, exclude: tuple | None = None) -> list[tuple]:
    """``n`` distinct architectures spread evenly over ``levels`` latency bands, ``exclude`` (the teacher) not among them.

    A band no architecture reaches (the slow end of a mixed-precision space under a size limit,
    say) hands its share to the bands that filled theirs, so the predictor still sees ``n`` samples.
    """
    rng = np.random.default_rng(seed)
    lo, hi = problem.min_latency(), problem.max_latency()
    edges = np.linspace(lo, hi, levels + 1)
    out, seen = [], set()
    want = [n // levels + (1 if i < n % levels else 0) for i in range(levels)]
    bands = list(range(levels))
    while bands:
        filled = []
        for i in bands:
            got = sample_under_budget(problem, float(edges[i + 1]) + 1e-9, want[i], rng, lower_ms=float(edges[i]))
            for c in got:
                c = tuple(int(v) for v in c)
                if c not in seen and c != exclude:
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
        log.info("solve: %d distinct architectures sampled of the %d asked (the space or its limits allow no more)", len(out), n)
    return out[:n]


def evaluate_samples(ctx: PhaseContext, block_states: list[dict], choices_list: list[tuple]) -> list[dict]:
    """Proxy accuracy of each architecture, in parallel Ray tasks; finished chunks survive a crash."""
    import ray

    bound, path = ctx.bound, ctx.run.samples
    done = {tuple(s["choices"]): s for s in (read_json(path) if path.exists() else [])}
    todo = [c for c in choices_list if c not in done]
    if done:
        log.info("solve: %d of %d sampled students already evaluated, %d to evaluate", len(choices_list) - len(todo), len(choices_list), len(todo))
    if todo:
        cfg = bound.space.solve
        n_tasks = cfg.eval_tasks or cpu_slots(1)
        chunk = max(1, min(25, int(np.ceil(len(todo) / n_tasks))))
        chunks = [todo[i: i + chunk] for i in range(0, len(todo), chunk)]
        teacher_ref = ray.put({k: v.cpu() for k, v in bound.teacher.state_dict().items()})
        states_ref = ray.put(block_states)
        task = Task(proxy_accuracy_task, threads=1, num_cpus=1, num_gpus=cfg.num_gpus, max_retries=3)
        refs = {task.submit(bound.space.to_dict(), teacher_ref, states_ref, ch, bound.space.seed): ch for ch in chunks}
        for ref, accs in completed(list(refs), desc="solve (proxy accuracy)", total=len(todo), progress=ctx.progress, count=len):
            for c, acc in zip(refs[ref], accs):
                done[c] = {"choices": list(c), "arch": arch_to_str(bound.arch(c)), "proxy_acc": float(acc)}
            write_json(path, list(done.values()))
    return [done[c] for c in choices_list]


def encode(bound: BoundSpace, choices_list, encoding: str | None = None) -> np.ndarray:
    """Predictor inputs: the architecture over float operators (bit-widths enter through the penalty)."""
    floats, index = float_projection(bound)
    choices_list = [project(c, index) for c in choices_list]
    sizes = [len(f) for f in floats]
    if (encoding or bound.space.solve.predictor.encoding) == "index":
        return index_encode(choices_list, sizes)
    return one_hot_encode(choices_list, sizes)


def fit_predictor(bound: BoundSpace, samples: list[dict], seed: int, encoding: str | None = None,
                  output: str | None = None) -> tuple[MLPPredictor, dict]:
    """Train on a seeded split of the samples; report Spearman on the held-out part.

    ``encoding`` and ``output`` override the space's predictor settings (benchmarks compare them).
    """
    cfg = bound.space.solve
    n_hold = max(2, int(round(cfg.holdout * len(samples))))
    if len(samples) < n_hold + 2:
        raise EtaError(f"solve: only {len(samples)} distinct students could be sampled, too few to train and check the accuracy "
                       f"predictor ({n_hold} held out + 2): the space '{bound.space.name}' needs more operators per block or looser limits")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    hold, train = order[:n_hold], order[n_hold:]
    X = encode(bound, [s["choices"] for s in samples], encoding)
    y = np.array([s["proxy_acc"] for s in samples], dtype=np.float64)
    p = cfg.predictor
    model = train_predictor(X[train], y[train], hidden=p.hidden, layers=p.layers, activation=p.activation, output=output or p.output,
                            optimizer=p.optimizer, lr=p.lr, epochs=p.epochs, seed=seed)
    pred = model.predict(X[hold])
    metrics = {"spearman_holdout": float(spearman(pred, y[hold])), "n_train": int(len(train)), "n_holdout": int(len(hold)),
               "mae_holdout": float(np.mean(np.abs(pred - y[hold]))), "proxy_acc_range": [float(y.min()), float(y.max())],
               "holdout": {"choices": [samples[i]["choices"] for i in hold], "predicted": pred.tolist(), "proxy_acc": y[hold].tolist()}}
    return model, metrics


def solve_in_parallel(problem: SearchProblem, budgets: list[float], k_per_budget: int, seed: int, each_partition: bool = False):
    """Yield (budget, solutions) as each budget is solved: one Ray task per budget when Ray runs, else in turn."""
    import ray

    if len(budgets) <= 1 or not ray.is_initialized():
        for b in budgets:
            yield b, solve_budgets(problem, [b], k_per_budget=k_per_budget, seed=seed, each_partition=each_partition)[b]
        return
    task = Task(solve_budgets, threads=1, num_cpus=1, max_retries=2)
    shared = ray.put(problem)
    refs = {task.submit(shared, [b], k_per_budget, seed, each_partition=each_partition): b for b in budgets}
    for ref, result in completed(list(refs), desc="solve (budgets)", total=len(budgets), progress=False):
        yield refs[ref], result[refs[ref]]


def sampled_choices(bound: BoundSpace, problem: SearchProblem) -> list[tuple]:
    """The students the solve phase evaluates to train its predictor (deterministic for the space's seed).

    In a mixed space they are float students: bit-widths are priced by the quantization term.
    """
    cfg = bound.space.solve
    if not is_mixed(bound):
        # the teacher thinned uniformly (hidden widths, interface widths) first: the natural anchors of the
        # sub-spaces, which random draws that mix operators almost never hit
        anchors = bound.uniform_teacher_choices()
        drawn = sample_architectures(problem, cfg.samples, cfg.sample_levels, bound.space.seed, exclude=bound.teacher_choices())
        return anchors + [c for c in drawn if c not in anchors]
    # Float students over their own latency range, free of the size/BOPs limits, which only quantized
    # students must meet: under a tight limit few float projections of feasible students are distinct.
    keep = [[j for j, s in enumerate(opts) if s.bits == 32] for opts in bound.options]
    floats, keep = problem.restricted(keep)
    floats = replace(floats, limits=())
    tc = bound.teacher_choices()
    teacher = tuple(int(np.flatnonzero(k == j)[0]) for k, j in zip(keep, tc)) if tc is not None else None
    return [tuple(int(keep[b][j]) for b, j in enumerate(c))
            for c in sample_architectures(floats, cfg.samples, cfg.sample_levels, bound.space.seed, exclude=teacher)]


def best_measured(samples: list[dict], problem: SearchProblem, budget_ms: float, where=None) -> dict | None:
    """The sampled student with the highest measured proxy accuracy whose calibrated latency meets the budget
    (None if none); ``where(choices)`` narrows the samples (one interface width, say)."""
    feasible = [s for s in samples if (where is None or where(s["choices"])) and problem.latency(s["choices"]) <= budget_ms + 1e-9
                and bool(problem.within_limits_many([s["choices"]])[0])]
    return max(feasible, key=lambda s: s["proxy_acc"], default=None)


def budget_rows(rows: list[dict], samples: list[dict] | None, problem: SearchProblem, budget_ms: float, group, each_group: bool) -> list[dict]:
    """One budget's solutions in the order phase 3 takes them, ranked.

    The solver maximises a prediction of the proxy accuracy, so a sampled student measured under the
    budget that beats the solver's answers on the proxy itself joins them (per group, ``group(choices)``:
    the interface width). The best on the proxy goes first; with ``each_group`` the best of every
    other group follows (best first), then the rest, in the solver's order.
    """
    rows = list(rows)
    groups = list(dict.fromkeys(group(r["choices"]) for r in rows)) if each_group else [None]
    for g in groups if samples is not None else ():
        where = None if g is None else (lambda c, g=g: group(c) == g)
        best = best_measured(samples, problem, budget_ms, where)
        mine = [r["proxy_acc"] for r in rows if where is None or where(r["choices"])]
        if best is not None and best["proxy_acc"] > max(mine, default=-1.0) and list(best["choices"]) not in [r["choices"] for r in rows]:
            c = [int(v) for v in best["choices"]]
            rows.append(SolutionRow(budget_ms=float(budget_ms), rank=0, arch=best["arch"], choices=c,
                                    predicted_acc=float(problem.objective(c)), proxy_acc=float(best["proxy_acc"]),
                                    predicted_latency_ms=float(problem.latency(c)), solver_s=0.0, method="sampled").to_dict())
    if not rows:
        return rows
    top = max(rows, key=lambda r: r["proxy_acc"])
    heads = [top]
    if each_group:
        for g in dict.fromkeys(group(r["choices"]) for r in rows):
            if g != group(top["choices"]):
                heads.append(max((r for r in rows if group(r["choices"]) == g), key=lambda r: r["proxy_acc"]))
        heads = [top] + sorted(heads[1:], key=lambda r: -r["proxy_acc"])
    ordered = heads + [r for r in rows if not any(r is h for h in heads)]
    return [dict(r, rank=i) for i, r in enumerate(ordered)]


def selected_archs(ctx: PhaseContext) -> list[str]:
    """The distinct architectures of the solutions, best-ranked first, as many as the finetune phase takes."""
    data = read_json(ctx.run.solutions)
    try:
        rows = [SolutionRow.from_dict(r) for r in data]
    except (KeyError, TypeError, AttributeError) as err:
        raise EtaError(f"{ctx.run.solutions}: not the solutions of a solve phase (expected a list of rows; {first_line(err)})") from None
    archs = list(dict.fromkeys(r.arch for r in sorted(rows, key=lambda r: (r.rank, r.budget_ms))))
    return archs[: ctx.space.finetune.max_students]


def load(ctx: PhaseContext) -> dict:
    return {"solutions": read_json(ctx.run.solutions), "predictor": read_json(ctx.run.predictor_metrics)}


def run(ctx: PhaseContext, info: LatencyInfo, block_states: list[dict]) -> tuple[dict, dict]:
    bound, splits, run_dir = ctx.bound, ctx.splits, ctx.run
    cfg = bound.space.solve
    seed = bound.space.seed
    t0 = time.time()
    with ctx.ray(), ctx.tracker(NAME) as tr:
        choices_list = sampled_choices(bound, latency.search_problem(bound, info))
        samples = evaluate_samples(ctx, block_states, choices_list)
        eval_s = time.time() - t0
        predictor, pmetrics = fit_predictor(bound, samples, seed)
        predictor.save(run_dir.predictor_weights)
        pmetrics["sample_eval_s"] = eval_s
        write_json(run_dir.predictor_metrics, pmetrics)
        log.info("solve: accuracy predictor Spearman %.3f on %d held-out architectures", pmetrics["spearman_holdout"], pmetrics["n_holdout"])
        if cfg.predictor.encoding != "one_hot":
            log.info("solve: the solver needs a one-hot predictor; fitting one on the same samples for solving")
            predictor, _ = fit_predictor(bound, samples, seed, encoding="one_hot")
        bank = OperatorBank(bound, block_states)
        penalty = None
        if is_mixed(bound):
            qterms = read_json(run_dir.quantization) if run_dir.quantization.exists() else None
            if qterms is None:
                qterms = quantization_terms(bound, bank, splits, progress=ctx.progress)
                write_json(run_dir.quantization, qterms)
            penalty = qterms["penalty"]
        problem = predictor_problem(bound, info, predictor, penalty)
        each_width = cfg.each_width and len(bound.widths) > 1
        key = solve_key(problem, cfg.solutions_per_budget, seed, each_width)
        solved = read_json(run_dir.solved) if run_dir.solved.exists() else {}
        if solved.get("key") != key:  # solved with another predictor, latency table or settings
            solved = {"key": key, "budgets": {}}
        budgets = list(dict.fromkeys(float(b) for b in latency.budgets_ms(ctx.space, info)))
        for budget in budgets:
            if repr(budget) in solved["budgets"]:
                log.info("solve: budget %.4f ms already solved, keeping its solutions", budget)
        todo = [b for b in budgets if repr(b) not in solved["budgets"]]
        for budget, sols in solve_in_parallel(problem, todo, cfg.solutions_per_budget, seed, each_partition=each_width):
            rows = []
            for rank, sol in enumerate(sols):
                acc = proxy_accuracy(bank, splits, [sol.choices], seed=seed)[0]  # quantized when its bits say so
                rows.append(SolutionRow(budget_ms=float(budget), rank=rank, arch=arch_to_str(bound.arch(sol.choices)),
                                        choices=[int(c) for c in sol.choices], predicted_acc=float(sol.objective), proxy_acc=float(acc),
                                        predicted_latency_ms=float(sol.latency), solver_s=float(sol.wall_s), method=sol.method).to_dict())
            # float spaces: the samples are float students, comparable with the solutions (mixed: quantized)
            rows = budget_rows(rows, None if is_mixed(bound) else samples, problem, budget, bound.width_of, each_width)
            solved["budgets"][repr(budget)] = rows  # a solved budget survives a crash of the driver
            write_json(run_dir.solved, solved)
        rows = [r for b in budgets for r in solved["budgets"][repr(b)]]
        write_json(run_dir.solutions, rows)
        tr.summary(predictor_spearman=pmetrics["spearman_holdout"], samples=len(samples))
        tr.log({"solve/predictor_spearman": pmetrics["spearman_holdout"], "solve/sample_eval_s": eval_s})
        for r in rows:
            tr.log({"solve/solver_s": r["solver_s"], "solve/budget_ms": r["budget_ms"]})
        cols = list(rows[0].keys()) if rows else []
        tr.table("solve/solutions", cols, [[str(r[c]) if isinstance(r[c], list) else r[c] for c in cols] for r in rows])
        tr.table("solve/samples", ["arch", "proxy_acc"], [[s["arch"], s["proxy_acc"]] for s in samples])
    out = {"predictor": pmetrics, "solutions": rows}
    return out, {"wall_s": time.time() - t0, "spearman": pmetrics["spearman_holdout"]}
