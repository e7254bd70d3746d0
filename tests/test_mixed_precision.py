"""Operators and bit-widths chosen jointly: the solver against enumeration, and Free Bits respected."""
import itertools

import numpy as np
import pytest

from eta.mixed_precision import expand_first_layer, project
from eta.optimize import SearchProblem, exhaustive, solve_inlp


def mixed_problem(seed=0, blocks=3, floats=3, hidden=12):
    """Each float operator offered at 32 and 8 bits: int8 sometimes faster, sometimes slower (Free Bits)."""
    rng = np.random.default_rng(seed)
    index = [np.repeat(np.arange(floats), 2) for _ in range(blocks)]  # options: (f0,32) (f0,8) (f1,32) (f1,8) ...
    layers = [(rng.standard_normal((hidden, blocks * floats)) * 0.6, rng.standard_normal(hidden) * 0.1),
              (rng.standard_normal((1, hidden)) * 0.3, np.array([0.8]))]
    lat32 = [rng.uniform(0.5, 2.0, floats) for _ in range(blocks)]
    lat = [np.ravel(np.column_stack([l32, l32 * rng.uniform(0.6, 1.4, floats)])) for l32 in lat32]
    penalty = [np.ravel(np.column_stack([np.zeros(floats), rng.uniform(0.0, 0.05, floats)])) for _ in range(blocks)]
    problem = SearchProblem(option_latency=lat, layers=expand_first_layer(layers, index), base_latency=0.3, option_penalty=penalty)
    return problem, layers, index


def test_bit_variants_share_the_predictor_and_pay_their_penalty():
    problem, layers, index = mixed_problem()
    (W1, b1), (W2, b2) = layers
    for choices in itertools.islice(itertools.product(range(6), repeat=3), 0, 216, 7):
        x = np.zeros(W1.shape[1])
        for b, f in enumerate(project(choices, index)):
            x[b * 3 + f] = 1
        direct = float((W2 @ np.tanh(W1 @ x + b1) + b2)[0]) - sum(problem.option_penalty[b][j] for b, j in enumerate(choices))
        assert problem.objective(choices) == pytest.approx(direct)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_solution_matches_exhaustive_enumeration(seed):
    problem, _, _ = mixed_problem(seed)
    lo, hi = problem.min_latency(), problem.max_latency()
    for frac in (0.25, 0.5, 0.8):
        budget = lo + frac * (hi - lo)
        best = exhaustive(problem, budget)
        sol = solve_inlp(problem, budget, seed=seed)
        assert sol.latency <= budget + 1e-9
        assert sol.objective == pytest.approx(best.objective, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_slower_and_less_accurate_bit_width_is_never_chosen(seed):
    """Where 8 bits is slower than 32 in the table and carries a drop, no budget's solution uses it."""
    problem, _, _ = mixed_problem(seed)
    dominated = {(b, j) for b in range(problem.num_blocks) for j in range(1, 6, 2)
                 if problem.option_latency[b][j] >= problem.option_latency[b][j - 1] and problem.option_penalty[b][j] > 0}
    assert dominated  # the fixture must contain some
    lo, hi = problem.min_latency(), problem.max_latency()
    for frac in np.linspace(0.05, 1.0, 8):
        sol = solve_inlp(problem, lo + frac * (hi - lo), seed=seed)
        assert not {(b, j) for b, j in enumerate(sol.choices)} & dominated


def test_size_and_bops_limits_hold_for_the_chosen_student():
    """HAWQV3's model-size and BOPs constraints: additive per option, and the solution's real size obeys them."""
    from eta.bound import bind, splits_for
    from eta.mixed_precision import resource_limits
    from eta.space import parse_space
    from eta.student import size_mb, skeleton

    from .conftest import tiny_space_dict

    d = tiny_space_dict(bits=[32, 8, 4])
    loose = parse_space(d, "test")
    bound = bind(loose, splits_for(loose))
    arch = bound.arch([len(o) - 1 for o in bound.options])
    d["phase2"] = {**d["phase2"], "max_size_mb": 0.9 * size_mb(skeleton(bound, arch), arch)}
    bound = bind(parse_space(d, "test"), splits_for(loose))
    (sizes, limit), = resource_limits(bound)
    for choices in ([0] * bound.num_blocks, [len(o) - 1 for o in bound.options], [1] * bound.num_blocks):
        a = bound.arch(choices)
        fixed = size_mb(skeleton(bound, a), a) - sum(sizes[b][j] for b, j in enumerate(choices))
        assert fixed == pytest.approx(0.9 * size_mb(skeleton(bound, arch), arch) - limit, rel=1e-6)  # stem + head, constant
    problem = SearchProblem(option_latency=[np.ones(len(o)) for o in bound.options], limits=[(sizes, limit)],
                            layers=[(np.ones((1, sum(len(o) for o in bound.options))), np.zeros(1))], activation="relu")
    sol = exhaustive(problem, problem.max_latency())
    a = bound.arch(sol.choices)
    assert size_mb(skeleton(bound, a), a) <= d["phase2"]["max_size_mb"] + 1e-9
