"""Choosing architectures: ETA's integer non-linear program (eqs. 14.3–14.4) and its baselines.

Variables are one-hot per block over that block's options. The objective is the MLP predictor
(on the one-hot encoding) minus any additive per-option penalty (the modelled quantization drop);
the constraint is the calibrated latency base + Σ option ms ≤ budget (every option's figure already
calibrated, :meth:`eta.latency.calibrate.Calibration.additive`), plus any extra linear limits
(model size, BOPs). A space of several interface widths is a union of sub-spaces (``partitions``:
every block takes its option from one width's subset); each is solved on its own and the best kept,
which is exactly the optimum over the union. Gekko's APOPT solves it locally, warm-started by a few
cheap evolutionary searches polished by two-block local search; APOPT's answer is polished the
same way and the best found is returned, ``method`` saying where it came from. Exhaustive
enumeration, predictor-ranked random sampling, evolution and HANT's additive ILP are the baselines.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from scipy import special

from .errors import EtaError

log = logging.getLogger(__name__)


class InfeasibleBudget(EtaError):
    """No architecture of the space meets the requested latency (or the other limits)."""


@dataclass
class SearchProblem:
    """One block-wise choice problem: per-option latency tables and the predictor's weights.

    ``option_latency`` and ``base_latency`` are calibrated milliseconds, so a student's latency is
    their sum. ``layers`` may be empty (before a predictor exists): latency bounds and sampling still
    work. ``output="sigmoid"``: the last layer gives the logit of accuracy (see ``accuracy_predictor``).
    """

    option_latency: list[np.ndarray]
    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    activation: str = "tanh"
    output: str = "linear"
    base_latency: float = 0.0
    option_penalty: list[np.ndarray] | None = None
    limits: Sequence[tuple[list[np.ndarray], float]] = ()
    partitions: Sequence[Sequence[Sequence[int]]] | None = None  # per sub-space, each block's allowed options

    def __post_init__(self):
        if self.activation not in ("tanh", "relu"):
            raise EtaError(f"unknown predictor activation {self.activation!r} (tanh or relu)")
        if self.output not in ("linear", "sigmoid"):
            raise EtaError(f"unknown predictor output {self.output!r} (linear or sigmoid)")
        self.option_latency = [np.asarray(r, dtype=float) for r in self.option_latency]
        self.sizes = [len(r) for r in self.option_latency]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        if self.option_penalty is not None:
            self.option_penalty = [np.asarray(r, dtype=float) for r in self.option_penalty]
        self.layers = [(np.asarray(W, dtype=float), np.asarray(b, dtype=float)) for W, b in self.layers]
        if self.layers and self.layers[0][0].shape[1] != sum(self.sizes):
            raise EtaError(f"the predictor takes {self.layers[0][0].shape[1]} inputs but the one-hot encoding of this "
                           f"space has {sum(self.sizes)}: the solver needs a predictor trained on the one-hot encoding")

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    # --- vectorised evaluation over an (M, N) array of choices -----------------------------
    def latency_many(self, C) -> np.ndarray:
        C = np.atleast_2d(np.asarray(C, dtype=int))
        return self.base_latency + sum(self.option_latency[i][C[:, i]] for i in range(self.num_blocks))

    def objective_many(self, C) -> np.ndarray:
        if not self.layers:
            raise EtaError("this search problem has no predictor")
        C = np.atleast_2d(np.asarray(C, dtype=int))
        (W1, b1) = self.layers[0]
        h = sum(W1[:, self.offsets[i] + C[:, i]].T for i in range(self.num_blocks)) + b1
        for W, b in self.layers[1:]:
            h = np.tanh(h) if self.activation == "tanh" else np.maximum(h, 0)
            h = h @ W.T + b
        out = h[:, 0] if self.output == "linear" else special.expit(h[:, 0])
        if self.option_penalty is not None:
            out = out - sum(self.option_penalty[i][C[:, i]] for i in range(self.num_blocks))
        return out

    def within_limits_many(self, C) -> np.ndarray:
        C = np.atleast_2d(np.asarray(C, dtype=int))
        ok = np.ones(len(C), dtype=bool)
        for values, limit in self.limits:
            ok &= sum(np.asarray(values[i], float)[C[:, i]] for i in range(self.num_blocks)) <= limit + 1e-9
        return ok

    def objective(self, choices) -> float:
        return float(self.objective_many([choices])[0])

    def latency(self, choices) -> float:
        return float(self.latency_many([choices])[0])

    def min_latency(self) -> float:
        if self.partitions:
            return min(sub.min_latency() for sub, _ in self.sub_problems())
        return self.base_latency + sum(r.min() for r in self.option_latency)

    def max_latency(self) -> float:
        if self.partitions:
            return max(sub.max_latency() for sub, _ in self.sub_problems())
        return self.base_latency + sum(r.max() for r in self.option_latency)

    def sub_problems(self) -> list[tuple["SearchProblem", list[np.ndarray]]]:
        """One unpartitioned problem per partition, with each block's original option indices (the problem itself if none)."""
        if not self.partitions:
            return [(self, [np.arange(k) for k in self.sizes])]
        return [replace(self, partitions=None).restricted(part) for part in self.partitions]

    def restricted(self, keep: Sequence[Sequence[int]]) -> tuple["SearchProblem", list[np.ndarray]]:
        """The same problem over a subset of each block's options (e.g. the teacher's block at every
        bit-width, or float operators only); returns it with, per block, the kept original indices."""
        keep = [np.asarray(k, dtype=int) for k in keep]
        if len(keep) != self.num_blocks or any(len(k) == 0 for k in keep):
            raise EtaError("a restricted problem keeps at least one option in every block")
        partitions = None
        if self.partitions:  # each partition's options that survive, renumbered; partitions left empty somewhere drop out
            where = [{int(j): i for i, j in enumerate(k)} for k in keep]
            mapped = [[[where[b][int(j)] for j in opts if int(j) in where[b]] for b, opts in enumerate(part)] for part in self.partitions]
            partitions = [p for p in mapped if all(p)] or None
        cols = np.concatenate([self.offsets[i] + k for i, k in enumerate(keep)])
        layers = [(self.layers[0][0][:, cols], self.layers[0][1]), *self.layers[1:]] if self.layers else []
        sub = SearchProblem(
            option_latency=[r[k] for r, k in zip(self.option_latency, keep)], layers=layers, activation=self.activation, output=self.output,
            base_latency=self.base_latency,
            option_penalty=[p[k] for p, k in zip(self.option_penalty, keep)] if self.option_penalty is not None else None,
            limits=[([np.asarray(v, float)[k] for v, k in zip(values, keep)], limit) for values, limit in self.limits],
            partitions=partitions)
        return sub, keep

    def check_budget(self, budget_ms: float) -> None:
        """Fail in one line when no architecture can meet the budget."""
        fastest = self.min_latency()
        if budget_ms < fastest - 1e-12:
            raise InfeasibleBudget(f"budget {budget_ms:.3f} ms is infeasible: the smallest achievable latency is {fastest:.3f} ms")


@dataclass
class Solution:
    choices: tuple[int, ...]
    objective: float
    latency: float
    wall_s: float
    method: str


def _solution(problem, choices, t0, method) -> Solution:
    c = tuple(int(v) for v in choices)
    return Solution(c, problem.objective(c), problem.latency(c), time.time() - t0, method)


def _feasible(problem, C, budget, exclude=()):
    ok = (problem.latency_many(C) <= budget + 1e-9) & problem.within_limits_many(C)
    if len(exclude):
        ex = np.ravel_multi_index(np.asarray(exclude, dtype=int).reshape(-1, problem.num_blocks).T, problem.sizes)
        ok &= ~np.isin(np.ravel_multi_index(np.asarray(C, dtype=int).T, problem.sizes), ex)
    return ok


# --- sampling and heuristics ---------------------------------------------------------------------
def _repair_many(problem, C, budget, rng, lower=None, max_steps=100) -> tuple[np.ndarray, np.ndarray]:
    """Move every architecture into [lower, budget] by re-drawing one random block per step.

    Over budget, the block takes a random cheaper option; under ``lower``, a random dearer one
    that stays within budget. All rows move at once (numpy), so tight budgets do not starve the
    samplers. Returns the repaired rows and which of them landed in the band.
    """
    C = np.array(C, dtype=int, copy=True).reshape(-1, problem.num_blocks)
    lower = -np.inf if lower is None else float(lower)
    width = max(problem.sizes)
    table = np.full((problem.num_blocks, width), np.nan)
    for i, row in enumerate(problem.option_latency):
        table[i, : len(row)] = row
    lat = problem.latency_many(C) if len(C) else np.zeros(0)
    for _ in range(max_steps):
        rows = np.flatnonzero((lat > budget + 1e-9) | (lat < lower - 1e-9))
        if not len(rows):
            break
        blk = rng.integers(problem.num_blocks, size=len(rows))
        delta = table[blk] - table[blk, C[rows, blk]][:, None]  # NaN where a block has fewer options
        over = (lat[rows] > budget + 1e-9)[:, None]
        with np.errstate(invalid="ignore"):
            allowed = np.where(over, delta < 0, (delta > 0) & (lat[rows, None] + delta <= budget + 1e-9))
        keys = np.where(allowed, rng.random(allowed.shape), -1.0)
        pick = np.argmax(keys, axis=1)
        moved = np.flatnonzero(allowed.any(axis=1))
        C[rows[moved], blk[moved]] = pick[moved]
        lat[rows[moved]] += delta[moved, pick[moved]]
    lat = problem.latency_many(C) if len(C) else lat  # exact again, free of accumulated rounding
    return C, (lat <= budget + 1e-9) & (lat >= lower - 1e-9)


def sample_under_budget(problem, budget_ms, n, rng, *, lower_ms=None, patience=5) -> list[tuple]:
    """Up to ``n`` distinct random architectures with latency in [lower_ms, budget_ms].

    Uniform draws, each out-of-band one repaired toward the band; stops early (returning fewer)
    once ``patience`` rounds in a row add nothing new, so narrow bands and tiny spaces end quickly.
    """
    if problem.partitions:  # an equal share from each sub-space that reaches the band, the rest from those with more
        subs = problem.sub_problems()
        got = [[tuple(int(k[b][j]) for b, j in enumerate(c))
                for c in sample_under_budget(sub, budget_ms, n, rng, lower_ms=lower_ms, patience=patience)] for sub, k in subs]
        out = []
        for i in range(n):
            for g in got:
                if i < len(g):
                    out.append(g[i])
        return out[:n]
    lower = -np.inf if lower_ms is None else float(lower_ms)
    if n <= 0 or budget_ms < problem.min_latency() - 1e-9 or lower > min(budget_ms, problem.max_latency()) + 1e-9:
        return []
    out, seen, stale = [], set(), 0
    while len(out) < n and stale < patience:
        batch = max(64, 2 * (n - len(out)))
        C = np.stack([rng.integers(0, k, batch) for k in problem.sizes], axis=1)
        C, ok = _repair_many(problem, C, budget_ms, rng, lower)
        C = C[ok & problem.within_limits_many(C)]
        added = 0
        for c in map(tuple, C.tolist()):
            if c not in seen:
                seen.add(c)
                out.append(c)
                added += 1
                if len(out) >= n:
                    break
        stale = 0 if added else stale + 1
    return out


def random_search(problem, budget_ms, k, seed=0, exclude=()) -> Solution:
    """Predictor-ranked random sampling of ``k`` feasible architectures."""
    t0 = time.time()
    problem.check_budget(budget_ms)
    C = np.array(sample_under_budget(problem, budget_ms, k, np.random.default_rng(seed)), dtype=int)
    C = C[_feasible(problem, C, budget_ms, exclude)] if len(C) else C
    if not len(C):
        raise InfeasibleBudget(f"no feasible architecture found under {budget_ms:.3f} ms")
    return _solution(problem, C[int(np.argmax(problem.objective_many(C)))], t0, f"random(k={k})")


def evolutionary(problem, budget_ms, population=100, generations=30, seed=0, exclude=(), mutation=0.15) -> Solution:
    """Mutation + uniform crossover, feasibility by repair (the once-for-all style baseline)."""
    t0 = time.time()
    problem.check_budget(budget_ms)
    rng = np.random.default_rng(seed)
    pop = sample_under_budget(problem, budget_ms, population, rng)
    pop = np.array(pop) if pop else np.array([[int(np.argmin(r)) for r in problem.option_latency]])
    sizes = np.array(problem.sizes)
    for _ in range(generations):
        parents = pop[rng.integers(len(pop), size=(population, 2))]
        mask = rng.random((population, problem.num_blocks)) < 0.5
        kids = np.where(mask, parents[:, 0], parents[:, 1])
        mut = rng.random(kids.shape) < mutation
        kids = np.where(mut, rng.integers(0, sizes, size=kids.shape), kids)
        kids, ok = _repair_many(problem, kids, budget_ms, rng)
        allc = np.unique(np.vstack([pop, kids[ok]]), axis=0)
        allc = allc[_feasible(problem, allc, budget_ms, exclude)] if len(allc) else allc
        if not len(allc):
            break
        pop = allc[np.argsort(-problem.objective_many(allc))[:population]]
    if not len(pop) or not _feasible(problem, pop[:1], budget_ms, exclude)[0]:
        raise InfeasibleBudget(f"evolution found no feasible architecture under {budget_ms:.3f} ms")
    return _solution(problem, pop[0], t0, f"evolution(p={population},g={generations})")


def exhaustive(problem, budget_ms, *, exclude=(), max_combinations=2_000_000, chunk=65_536) -> Solution:
    """The exact optimum by enumerating every architecture in numpy chunks (small spaces only)."""
    t0 = time.time()
    problem.check_budget(budget_ms)
    total = int(np.prod(problem.sizes, dtype=np.float64))
    if total > max_combinations:
        raise EtaError(f"exhaustive search over {total} architectures exceeds the limit of {max_combinations}")
    best, best_obj = None, -np.inf
    for start in range(0, total, chunk):
        flat = np.arange(start, min(start + chunk, total))
        C = np.stack(np.unravel_index(flat, problem.sizes), axis=1)
        ok = _feasible(problem, C, budget_ms, exclude)
        if problem.partitions:  # enumerated over the whole product, kept where every block lies in one partition
            ok &= np.any([np.all([np.isin(C[:, b], opts) for b, opts in enumerate(part)], axis=0) for part in problem.partitions], axis=0)
        C = C[ok]
        if len(C):
            obj = problem.objective_many(C)
            i = int(np.argmax(obj))
            if obj[i] > best_obj:
                best, best_obj = C[i], obj[i]
    if best is None:
        raise InfeasibleBudget(f"no architecture meets the budget of {budget_ms:.3f} ms with the exclusions given")
    return _solution(problem, best, t0, "exhaustive")


def additive_ilp(option_drop, problem, budget_ms) -> Solution:
    """HANT (eqs. 14.5–14.6): minimise the summed per-block accuracy drops under the budget, exactly."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    t0 = time.time()
    problem.check_budget(budget_ms)
    n = sum(problem.sizes)
    cost = np.concatenate([np.asarray(d, float) for d in option_drop])
    rows, lo, hi = [], [], []
    for i, k in enumerate(problem.sizes):
        r = np.zeros(n)
        r[problem.offsets[i] : problem.offsets[i] + k] = 1
        rows.append(r), lo.append(1), hi.append(1)
    rows.append(np.concatenate(problem.option_latency))
    lo.append(-np.inf)
    hi.append(budget_ms - problem.base_latency)
    for values, limit in problem.limits:
        rows.append(np.concatenate([np.asarray(v, float) for v in values]))
        lo.append(-np.inf)
        hi.append(limit)
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        raise InfeasibleBudget(f"additive ILP: no solution under {budget_ms:.3f} ms")
    x = np.round(res.x).astype(int)
    choices = [int(np.argmax(x[o : o + k])) for o, k in zip(problem.offsets, problem.sizes)]
    sol = Solution(tuple(choices), problem.objective(choices) if problem.layers else float(-res.fun), problem.latency(choices), time.time() - t0, "additive-ilp")
    return sol


def local_search(problem, choices, budget_ms, *, exclude=(), max_rounds=100) -> tuple[int, ...]:
    """Best-improvement ascent over all one- and two-block changes that stay feasible.

    Two-block moves let a block spend latency another one frees, which single swaps under a tight
    budget cannot; it polishes heuristic answers before they warm-start (or compete with) APOPT.
    """
    c = np.asarray(choices, dtype=int)
    best = problem.objective(c)
    pairs = [(i, j) for i in range(problem.num_blocks) for j in range(i + 1, problem.num_blocks)]
    for _ in range(max_rounds):
        moves = [np.repeat(c[None], problem.sizes[i], 0) for i in range(problem.num_blocks)]
        for i, m in enumerate(moves):
            m[:, i] = np.arange(problem.sizes[i])
        for i, j in pairs:
            vi, vj = np.meshgrid(np.arange(problem.sizes[i]), np.arange(problem.sizes[j]), indexing="ij")
            m = np.repeat(c[None], vi.size, 0)
            m[:, i], m[:, j] = vi.ravel(), vj.ravel()
            moves.append(m)
        C = np.vstack(moves)
        C = C[_feasible(problem, C, budget_ms, exclude)]
        if not len(C):
            break
        obj = problem.objective_many(C)
        k = int(np.argmax(obj))
        if obj[k] <= best + 1e-12:
            break
        c, best = C[k], float(obj[k])
    return tuple(int(v) for v in c)


# --- Gekko INLP -----------------------------------------------------------------------------------
APOPT_OPTIONS = (
    "minlp_maximum_iterations 2000",  # branch-and-bound nodes
    "minlp_max_iter_with_int_sol 200",  # stop this many nodes after an integer solution stops improving
    "minlp_gap_tol 1e-4",
    "minlp_integer_tol 1e-3",
    "nlp_maximum_iterations 300",
)


def _affine(m, weights, terms, const, chunk=150):
    """Σ w·t + c as Gekko Intermediates, split so no equation string outgrows APM's line limit."""
    pairs = [(float(w), t) for w, t in zip(weights, terms) if w != 0]
    parts = [m.Intermediate(sum(w * t for w, t in pairs[k : k + chunk])) for k in range(0, len(pairs), chunk)]
    if not parts:
        return m.Const(value=const)
    return m.Intermediate(sum(parts) + const) if len(parts) > 1 else m.Intermediate(parts[0] + const)


def _gekko_solve(problem, budget_ms, exclude, warm, time_limit_s, apopt_options=APOPT_OPTIONS):
    """One APOPT solve from ``warm``: (rounded one-hot answer, objective as Gekko computed it).

    Raises whatever Gekko raises when APOPT finds no solution.
    """
    from gekko import GEKKO

    m = GEKKO(remote=False)
    try:
        x = [[m.Var(value=int(warm[i] == j), lb=0, ub=1, integer=True) for j in range(k)] for i, k in enumerate(problem.sizes)]
        for row in x:
            m.Equation(m.sum(row) == 1)
        xs = [v for row in x for v in row]  # same order as the one-hot encoding
        m.Equation(_affine(m, np.concatenate(problem.option_latency), xs, problem.base_latency) <= budget_ms)
        for values, limit in problem.limits:
            m.Equation(_affine(m, np.concatenate([np.asarray(v, float) for v in values]), xs, 0.0) <= limit)
        for e in exclude:
            m.Equation(sum(x[i][int(c)] for i, c in enumerate(e)) <= problem.num_blocks - 1)
        h = xs
        for li, (W, bias) in enumerate(problem.layers):
            pre = [_affine(m, W[o], h, float(bias[o])) for o in range(W.shape[0])]
            if li < len(problem.layers) - 1:
                pre = [m.Intermediate(m.tanh(v) if problem.activation == "tanh" else m.max2(v, 0)) for v in pre]
            h = pre
        obj = h[0] if problem.output == "linear" else m.Intermediate(1 / (1 + m.exp(-h[0])))
        if problem.option_penalty is not None:
            obj = obj - _affine(m, np.concatenate(problem.option_penalty), xs, 0.0)
        m.Maximize(obj)
        m.options.SOLVER = 1  # APOPT: mixed-integer, local
        m.options.IMODE = 3
        m.options.MAX_TIME = time_limit_s
        m.solver_options = list(apopt_options)
        m.solve(disp=False)
        choices = tuple(int(np.argmax([v.value[0] for v in row])) for row in x)
        return choices, -float(m.options.OBJFCNVAL)  # Gekko minimises −objective
    finally:
        m.cleanup()


def warm_start(problem, budget_ms, *, exclude=(), seed=0, restarts=4, population=300, generations=100) -> Solution:
    """The cheap heuristic APOPT starts from: the best of a few evolutions, each polished by local search.

    Tens of milliseconds at 8 blocks × 10 options, against seconds for APOPT; restarts guard
    against one evolution settling on a poor local optimum.
    """
    t0 = time.time()
    best = None
    for run_seed in np.random.default_rng(seed).integers(2**31, size=restarts):
        try:
            evo = evolutionary(problem, budget_ms, population=population, generations=generations, seed=int(run_seed), exclude=exclude)
        except InfeasibleBudget:
            continue
        c = local_search(problem, evo.choices, budget_ms, exclude=exclude)
        obj = problem.objective(c)
        if best is None or obj > best[0]:
            best = (obj, c)
    if best is None:
        raise InfeasibleBudget(f"the heuristic found no architecture under {budget_ms:.3f} ms with the limits and exclusions given")
    return _solution(problem, best[1], t0, "heuristic")


def solve_inlp(problem, budget_ms, *, exclude=(), seed=0, time_limit_s=60) -> Solution:
    """max predictor − penalty s.t. calibrated latency ≤ budget, by Gekko/APOPT from a warm start.

    APOPT is a local branch-and-bound on a non-convex objective, so its answer is polished by
    the same local search and compared with the warm start. ``method`` says which won: ``inlp``
    (APOPT's answer as is), ``inlp+local`` (APOPT's answer, improved by local search),
    ``inlp(warm)`` (the warm start was better) or ``heuristic`` (APOPT failed outright).
    """
    t0 = time.time()
    problem.check_budget(budget_ms)
    try:
        warm = warm_start(problem, budget_ms, exclude=exclude, seed=seed)
    except InfeasibleBudget:  # the heuristic found nothing feasible; APOPT may still
        warm = None
    start = warm.choices if warm is not None else tuple(int(np.argmin(r)) for r in problem.option_latency)
    try:
        cand, _ = _gekko_solve(problem, budget_ms, exclude, start, time_limit_s)
    except Exception as err:  # APOPT reports failures as exceptions of several kinds
        if warm is None:
            raise InfeasibleBudget(f"no architecture found under the budget of {budget_ms:.3f} ms with the limits and exclusions given") from err
        log.warning("Gekko/APOPT failed at budget %.3f ms (%s); keeping the heuristic warm start",
                    budget_ms, (str(err).strip().splitlines() or ["no message"])[0][:160])
        return _solution(problem, warm.choices, t0, "heuristic")
    found = []  # (objective, choices, method) in order of preference when objectives tie
    if _feasible(problem, np.array([cand]), budget_ms, exclude)[0]:
        found.append((problem.objective(cand), cand, "inlp"))
        polished = local_search(problem, cand, budget_ms, exclude=exclude)
        found.append((problem.objective(polished), polished, "inlp+local"))
    else:
        log.warning("Gekko/APOPT returned an architecture breaking a constraint at budget %.3f ms; ignoring it", budget_ms)
    if warm is not None:
        found.append((warm.objective, warm.choices, "inlp(warm)"))
    if not found:
        raise InfeasibleBudget(f"no architecture found under the budget of {budget_ms:.3f} ms with the limits and exclusions given")
    top = max(f[0] for f in found)
    _, choices, method = next(f for f in found if f[0] >= top - 1e-12)
    if method != "inlp":
        log.info("budget %.3f ms: APOPT's own answer was not the best found (%s)", budget_ms, method)
    return _solution(problem, choices, t0, method)


def solve_budgets(problem, budgets_ms, k_per_budget=1, seed=0, time_limit_s=60, *, each_partition: bool = False) -> dict[float, list[Solution]]:
    """``k`` distinct solutions per budget, each solve excluding the earlier ones of that budget.

    A partitioned problem: ``k`` per budget from each sub-space, the best ``k`` of all kept, or with
    ``each_partition`` the best ``k`` of every sub-space that fits the budget (best first overall).
    """
    if problem.partitions:
        found: dict[float, list[Solution]] = {float(b): [] for b in budgets_ms}
        for sub, keep in problem.sub_problems():
            for budget in budgets_ms:
                try:
                    sols = solve_budgets(sub, [budget], k_per_budget, seed, time_limit_s)[float(budget)]
                except InfeasibleBudget:
                    continue
                for sol in sols:
                    c = tuple(int(keep[b][j]) for b, j in enumerate(sol.choices))
                    found[float(budget)].append(replace(sol, choices=c))
        for budget, sols in found.items():
            if not sols:
                problem.check_budget(budget)
                raise InfeasibleBudget(f"no architecture found under the budget of {budget:.3f} ms with the limits given")
            found[budget] = sorted(sols, key=lambda s: -s.objective)[: None if each_partition else k_per_budget]
        return found
    out = {}
    for budget in budgets_ms:
        sols = []
        for _ in range(k_per_budget):
            try:
                sols.append(solve_inlp(problem, budget, exclude=[s.choices for s in sols], seed=seed, time_limit_s=time_limit_s))
            except InfeasibleBudget:
                if not sols:
                    raise
                break
        out[float(budget)] = sols
    return out
