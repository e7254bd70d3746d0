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
    d["solve"] = {**d["solve"], "max_size_mb": 0.9 * size_mb(skeleton(bound, arch), arch)}
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
    assert size_mb(skeleton(bound, a), a) <= d["solve"]["max_size_mb"] + 1e-9


def test_a_restricted_problem_scores_its_options_as_the_full_problem_does():
    """Sub-spaces (the teacher's block at every bit-width, float operators only) keep each option's terms."""
    problem, _, _ = mixed_problem(seed=4)
    problem.limits = [([np.arange(6, dtype=float)] * 3, 9.0)]
    sub, kept = problem.restricted([[1, 3, 5], [0, 2], [4]])
    for c in itertools.product(range(3), range(2), range(1)):
        full = tuple(int(kept[b][j]) for b, j in enumerate(c))
        assert sub.objective(c) == pytest.approx(problem.objective(full))
        assert sub.latency(c) == pytest.approx(problem.latency(full))
        assert sub.within_limits_many([c])[0] == problem.within_limits_many([full])[0]
    with pytest.raises(Exception, match="at least one option"):
        problem.restricted([[0], [], [1]])


def test_teacher_blocks_are_offered_at_every_bit_width_and_quantize_like_pool_operators():
    """tiny_mbnet's blocks are timm InvertedResiduals: the space offers them at 8/4 bits, described as 'ir'."""
    from eta.bound import bind, splits_for
    from eta.quant.lowering import describe
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    space = parse_space(tiny_space_dict(bits=[32, 8, 4]), "test")
    bound = bind(space, splits_for(space))
    for b, opts in enumerate(bound.options):
        assert {s.bits for s in opts if s.family == "teacher"} == {32, 8, 4}
        family, convs, _ = describe(bound.split.blocks[b])
        assert family == "ir" and set(convs) == {"conv_pw", "conv_dw", "conv_pwl"}


@pytest.mark.slow
def test_a_quantized_solution_is_evaluated_as_the_integer_module_runs():
    """Phase 2 scores a 4-bit solution by its quantized network: the TVM integer module's proxy accuracy."""
    import torch

    from eta.bound import bind, splits_for
    from eta.data import batches
    from eta.mixed_precision import quantize_stitched
    from eta.quant import compile_network_int
    from eta.phases.solve import proxy_accuracy
    from eta.space import parse_space
    from eta.student import OperatorBank, block_super_ops
    from eta.threads import torch_threads
    from eta.train import fit

    from .conftest import tiny_space_dict

    space = parse_space(tiny_space_dict(bits=[32, 4]), "test")
    splits = splits_for(space)
    bound = bind(space, splits)
    fit(bound.teacher, splits.train, epochs=4, lr=0.004, weight_decay=0.05, batch_size=64, resolutions=[16], seed=0, progress=False)
    bank = OperatorBank(bound, [block_super_ops(bound, b, True).state_dict() for b in range(bound.num_blocks)])
    tc = bound.teacher_choices()
    w4 = tuple(bound.options[b].index(bound.options[b][j].with_bits(4)) for b, j in enumerate(tc))
    float_acc, w4_acc = proxy_accuracy(bank, splits, [tc, w4], seed=space.seed)
    with torch_threads(1):
        q = quantize_stitched(bound, bank.stitch(bound.arch(w4)), bound.arch(w4), splits)
    compiled = compile_network_int(q, (32, 1, 16, 16))
    right = n = 0
    for x, y in batches(splits.proxy, 32, resolution=16):
        right += int((torch.from_numpy(compiled.run(x)).argmax(1) == y).sum())
        n += len(y)
    assert w4_acc == pytest.approx(right / n, abs=1.5 / n)  # the integer module's accuracy (a tie may flip one image)
    assert w4_acc != float_acc  # and not the float network's


def test_a_mixed_space_under_a_tight_size_limit_still_samples_float_students_for_the_predictor():
    """The predictor learns float accuracy: its samples span the float students, not the few a size limit leaves."""
    from eta.bound import bind, splits_for
    from eta.phases.solve import sampled_choices
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    d = tiny_space_dict(bits=[32, 8, 4])
    d["pool"] = [{"family": "ir", "kernel": [3], "expansion": [2, 4]}, {"family": "teacher"}]
    space = parse_space(d, "probe")
    bound = bind(space, splits_for(space))
    rng = np.random.default_rng(0)
    latency = [rng.uniform(0.1, 1.0, len(opts)) for opts in bound.options]
    size = [np.array([s.bits / 32 for s in opts]) for opts in bound.options]  # no float operator fits the limit below
    problem = SearchProblem(option_latency=latency, limits=[(size, 0.2 * len(size))])
    got = sampled_choices(bound, problem)
    assert len(got) == space.solve.samples and len(set(got)) == len(got)
    assert all(bound.options[b][j].bits == 32 for c in got for b, j in enumerate(c))
    assert bound.teacher_choices() not in got
    lat = problem.latency_many(got)
    floats, _ = problem.restricted([[j for j, s in enumerate(o) if s.bits == 32] for o in bound.options])
    assert lat.min() < floats.min_latency() + 0.2 * (floats.max_latency() - floats.min_latency())  # spread over the float range
    assert lat.max() > floats.max_latency() - 0.2 * (floats.max_latency() - floats.min_latency())


def test_unreachable_latency_bands_hand_their_samples_to_the_others():
    """Under a size limit the slow end of the space is empty; phase 2 still gets the samples it asked for."""
    from eta.phases.solve import sample_architectures

    problem, _, _ = mixed_problem(seed=5, blocks=5, floats=3)
    size = [r.copy() for r in problem.option_latency]  # size grows with latency: the slow end cannot fit
    problem.limits = [(size, 0.6 * sum(r.max() for r in size))]
    got = sample_architectures(problem, 60, 10, seed=0)
    assert len(got) == 60 and len(set(got)) == 60
    assert problem.within_limits_many(got).all()
    lat = problem.latency_many(got)
    edges = np.linspace(problem.min_latency(), problem.max_latency(), 11)
    assert (np.histogram(lat, bins=edges)[0] == 0).any()  # some bands are empty: their share went elsewhere
