"""Choosing architectures: ETA's integer non-linear program (eqs. 14.3–14.4) and its baselines.

Variables are one-hot per block over that block's options. The objective is the MLP predictor
(on the one-hot encoding) minus any additive per-option penalty (the modelled quantization drop);
the constraint is the calibrated table latency a·(base + Σ option ms) + b ≤ budget, plus any
extra linear limits (model size, BOPs). Gekko's APOPT solves it locally; the best architecture of a
cheap evolutionary search warm-starts it, and the better of the two is returned. Exhaustive
enumeration, predictor-ranked random sampling, evolution and HANT's additive ILP are the baselines.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import EtaError

log = logging.getLogger(__name__)


class InfeasibleBudget(EtaError):
    pass


@dataclass
class SearchProblem:
    option_latency: list
    layers: list = field(default_factory=list)
    activation: str = "tanh"
    base_latency: float = 0.0
    calibration: tuple = (1.0, 0.0)
    option_penalty: list | None = None
    limits: Sequence = ()

    def __post_init__(self):
        self.option_latency = [np.asarray(r, dtype=float) for r in self.option_latency]
        self.sizes = [len(r) for r in self.option_latency]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        if self.option_penalty is not None:
            self.option_penalty = [np.asarray(r, dtype=float) for r in self.option_penalty]

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    # --- vectorised evaluation over an (M, N) array of choices -----------------------------
    def _table_sum(self, C: np.ndarray) -> np.ndarray:
        return self.base_latency + sum(self.option_latency[i][C[:, i]] for i in range(self.num_blocks))

    def latency_many(self, C) -> np.ndarray:
        a, b = self.calibration
        return a * self._table_sum(np.atleast_2d(np.asarray(C, dtype=int))) + b

    def objective_many(self, C) -> np.ndarray:
        if not self.layers:
            raise EtaError("this search problem has no predictor")
        C = np.atleast_2d(np.asarray(C, dtype=int))
        (W1, b1) = self.layers[0]
        h = sum(W1[:, self.offsets[i] + C[:, i]].T for i in range(self.num_blocks)) + b1
        for W, b in self.layers[1:]:
            h = np.tanh(h) if self.activation == "tanh" else np.maximum(h, 0)
            h = h @ W.T + b
        out = h[:, 0]
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
        a, b = self.calibration
        return a * (self.base_latency + sum(r.min() for r in self.option_latency)) + b

    def max_latency(self) -> float:
        a, b = self.calibration
        return a * (self.base_latency + sum(r.max() for r in self.option_latency)) + b

    def check_budget(self, budget_ms: float) -> None:
        if budget_ms < self.min_latency() - 1e-12:
            raise InfeasibleBudget(f"budget {budget_ms:.3f} ms is infeasible: the fastest student takes {self.min_latency():.3f} ms")


@dataclass
class Solution:
    choices: tuple
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
        ex = {tuple(int(v) for v in e) for e in exclude}
        ok &= np.array([tuple(c) not in ex for c in C.tolist()])
    return ok


# --- sampling and heuristics ---------------------------------------------------------------------
def _repair(problem, c, budget, rng, lower=None, max_steps=200):
    """Move a random architecture into [lower, budget] by swapping single blocks."""
    c = list(c)
    lat = problem.latency(c)
    for _ in range(max_steps):
        if lat > budget:
            i = int(rng.integers(problem.num_blocks))
            cheaper = np.flatnonzero(problem.option_latency[i] < problem.option_latency[i][c[i]])
            if len(cheaper):
                c[i] = int(rng.choice(cheaper))
        elif lower is not None and lat < lower:
            i = int(rng.integers(problem.num_blocks))
            room = (budget - lat) / problem.calibration[0]
            dearer = np.flatnonzero((problem.option_latency[i] > problem.option_latency[i][c[i]])
                                    & (problem.option_latency[i] - problem.option_latency[i][c[i]] <= room + 1e-12))
            if len(dearer):
                c[i] = int(rng.choice(dearer))
        else:
            return tuple(c)
        lat = problem.latency(c)
    return tuple(c) if lat <= budget + 1e-9 and (lower is None or lat >= lower - 1e-9) else None


def sample_under_budget(problem, budget_ms, n, rng, *, lower_ms=None) -> list[tuple]:
    """Up to ``n`` distinct random architectures with latency in [lower_ms, budget_ms]."""
    out, seen = [], set()
    for _ in range(n * 20):
        if len(out) >= n:
            break
        c = tuple(int(rng.integers(k)) for k in problem.sizes)
        c = _repair(problem, c, budget_ms, rng, lower_ms)
        if c is not None and c not in seen and problem.within_limits_many([c])[0]:
            seen.add(c)
            out.append(c)
    return out


def random_search(problem, budget_ms, k, seed=0, exclude=()) -> Solution:
    """Predictor-ranked random sampling of ``k`` feasible architectures."""
    t0 = time.time()
    problem.check_budget(budget_ms)
    cands = sample_under_budget(problem, budget_ms, k, np.random.default_rng(seed))
    C = np.array(cands)
    C = C[_feasible(problem, C, budget_ms, exclude)]
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
        kids = [c for c in (_repair(problem, k, budget_ms, rng) for k in kids) if c is not None]
        allc = np.unique(np.vstack([pop] + ([np.array(kids)] if kids else [])), axis=0)
        allc = allc[_feasible(problem, allc, budget_ms, exclude)] if len(allc) else allc
        if not len(allc):
            break
        pop = allc[np.argsort(-problem.objective_many(allc))[:population]]
    if not len(pop) or not _feasible(problem, pop[:1], budget_ms, exclude)[0]:
        raise InfeasibleBudget(f"evolution found no feasible architecture under {budget_ms:.3f} ms")
    return _solution(problem, pop[0], t0, f"evolution(p={population},g={generations})")


def exhaustive(problem, budget_ms, *, exclude=(), max_combinations=2_000_000, chunk=200_000) -> Solution:
    t0 = time.time()
    problem.check_budget(budget_ms)
    total = int(np.prod(problem.sizes, dtype=np.float64))
    if total > max_combinations:
        raise EtaError(f"exhaustive search over {total} architectures exceeds the limit of {max_combinations}")
    best, best_obj = None, -np.inf
    it = itertools.product(*[range(k) for k in problem.sizes])
    while True:
        C = np.array(list(itertools.islice(it, chunk)), dtype=int)
        if not len(C):
            break
        C = C[_feasible(problem, C, budget_ms, exclude)]
        if len(C):
            obj = problem.objective_many(C)
            i = int(np.argmax(obj))
            if obj[i] > best_obj:
                best, best_obj = C[i], obj[i]
    if best is None:
        raise InfeasibleBudget(f"no architecture meets {budget_ms:.3f} ms with the exclusions given")
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
    a, b = problem.calibration
    rows.append(np.concatenate(problem.option_latency) * a)
    lo.append(-np.inf)
    hi.append(budget_ms - b - a * problem.base_latency)
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


# --- Gekko INLP -----------------------------------------------------------------------------------
def _gekko_solve(problem, budget_ms, exclude, warm, time_limit_s):
    from gekko import GEKKO

    m = GEKKO(remote=False)
    try:
        x = [[m.Var(value=int(warm[i] == j), lb=0, ub=1, integer=True) for j in range(k)] for i, k in enumerate(problem.sizes)]
        for row in x:
            m.Equation(m.sum(row) == 1)
        a, b = problem.calibration
        lat = problem.base_latency + sum(float(problem.option_latency[i][j]) * x[i][j] for i in range(problem.num_blocks) for j in range(problem.sizes[i]))
        m.Equation(a * lat + b <= budget_ms)
        for values, limit in problem.limits:
            m.Equation(sum(float(values[i][j]) * x[i][j] for i in range(problem.num_blocks) for j in range(problem.sizes[i])) <= limit)
        for e in exclude:
            m.Equation(sum(x[i][int(c)] for i, c in enumerate(e)) <= problem.num_blocks - 1)
        flat = [(i, j) for i in range(problem.num_blocks) for j in range(problem.sizes[i])]
        W1, b1 = problem.layers[0]
        h = []
        for u in range(W1.shape[0]):
            pre = float(b1[u]) + sum(float(W1[u, problem.offsets[i] + j]) * x[i][j] for i, j in flat if W1[u, problem.offsets[i] + j] != 0)
            h.append(m.Intermediate(m.tanh(pre) if problem.activation == "tanh" else m.max2(pre, 0)))
        for li, (W, bb) in enumerate(problem.layers[1:]):
            nxt = [float(bb[o]) + sum(float(W[o, u]) * h[u] for u in range(W.shape[1])) for o in range(W.shape[0])]
            last = li == len(problem.layers) - 2
            h = nxt if last else [m.Intermediate(m.tanh(v) if problem.activation == "tanh" else m.max2(v, 0)) for v in nxt]
        obj = h[0]
        if problem.option_penalty is not None:
            obj = obj - sum(float(problem.option_penalty[i][j]) * x[i][j] for i, j in flat)
        m.Maximize(obj)
        m.options.SOLVER = 1  # APOPT: mixed-integer, local
        m.options.IMODE = 3
        m.options.MAX_TIME = time_limit_s
        m.solver_options = ["minlp_maximum_iterations 2000", "minlp_max_iter_with_int_sol 200", "minlp_gap_tol 1e-4",
                            "nlp_maximum_iterations 300", "minlp_integer_tol 1e-3"]
        m.solve(disp=False)
        return tuple(int(np.argmax([v.value[0] for v in row])) for row in x)
    finally:
        m.cleanup()


def solve_inlp(problem, budget_ms, *, exclude=(), seed=0, time_limit_s=60) -> Solution:
    """max predictor − penalty s.t. calibrated latency ≤ budget, by Gekko/APOPT from a warm start."""
    t0 = time.time()
    problem.check_budget(budget_ms)
    warm = evolutionary(problem, budget_ms, population=64, generations=15, seed=seed, exclude=exclude)
    best, method = warm.choices, "inlp(warm start kept)"
    try:
        cand = _gekko_solve(problem, budget_ms, exclude, warm.choices, time_limit_s)
        C = np.array([cand])
        if _feasible(problem, C, budget_ms, exclude)[0] and problem.objective(cand) >= problem.objective(best) - 1e-12:
            best, method = cand, "inlp"
    except Exception as err:  # APOPT reports failures as exceptions of several kinds
        log.warning("Gekko/APOPT failed at budget %.3f ms (%s); keeping the heuristic warm start", budget_ms, str(err).splitlines()[0][:120])
        method = "heuristic"
    return _solution(problem, best, t0, method)


def solve_budgets(problem, budgets_ms, k_per_budget=1, seed=0) -> dict:
    """``k`` distinct solutions per budget, each solve excluding the earlier ones of that budget."""
    out = {}
    for budget in budgets_ms:
        sols = []
        for _ in range(k_per_budget):
            try:
                sols.append(solve_inlp(problem, budget, exclude=[s.choices for s in sols], seed=seed))
            except InfeasibleBudget:
                if not sols:
                    raise
                break
        out[float(budget)] = sols
    return out
