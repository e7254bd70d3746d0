"""Interface widths: the teacher thinned between its blocks, the sub-spaces per width, and the solver over their union."""
import numpy as np
import pytest
import torch

from eta.arch import OpSpec, arch_from_str, arch_to_str, arch_width
from eta.bound import BoundSpace
from eta.errors import EtaError
from eta.interfaces import channels_at, describe_interfaces, slice_channels, thin
from eta.optimize import SearchProblem, exhaustive, sample_under_budget, solve_budgets
from eta.phases.latency import option_latency_matrix, space_workloads, workload_signature
from eta.space import parse_space
from eta.teachers import build_teacher, features_at_blocks, split_teacher
from eta.zoo import small_resnet, tiny_mbnet

from .conftest import tiny_space_dict, with_batchnorm_statistics


def _split(build, shape):
    torch.manual_seed(0)
    return split_teacher(with_batchnorm_statistics(build(), shape), "auto")


TEACHERS = {
    "small_resnet": (lambda: small_resnet(), (1, 28, 28)),
    "tiny_mbnet": (lambda: tiny_mbnet(), (1, 32, 32)),
    "torchvision_resnet18": (lambda: build_teacher("torchvision.models:resnet18", num_classes=10, in_chans=3), (3, 32, 32)),
}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_interface_groups_carry_every_boundary_once_and_thinning_keeps_the_teachers_channels(name):
    build, shape = TEACHERS[name]
    split = _split(build, shape)
    interfaces = describe_interfaces(split, shape)
    carried = sorted(j for i in interfaces for j in i.boundaries)
    assert carried == list(range(len(split.blocks) + 1))
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    feats = features_at_blocks(split, x, range(len(split.blocks)))
    thinned = thin(split, interfaces, 0.5)
    # the thinned stem is a slice of the teacher's: exactly the teacher's features at the kept channels
    torch.testing.assert_close(thinned.split.stem(x), slice_channels(feats[0][0], thinned.kept[0]), rtol=1e-5, atol=1e-5)
    for i in interfaces:
        for j in i.boundaries:
            assert len(thinned.kept[j]) == channels_at(i.group.full, 0.5) < i.group.full
            assert torch.equal(thinned.kept[j], thinned.kept[i.boundaries[0]])  # coupled boundaries keep the same channels
    assert thinned.split(x).shape == (3, 10)


def test_known_interfaces_of_the_resnet_teacher_and_a_full_width_thinning_is_only_a_permutation():
    split = _split(*TEACHERS["small_resnet"])
    interfaces = describe_interfaces(split, (1, 28, 28))
    assert sorted(i.boundaries for i in interfaces) == [(0, 1, 2), (3, 4), (5, 6, 7)]  # stages of 16, 32, 64 channels
    assert sorted(i.group.full for i in interfaces) == [16, 32, 64]
    # a width that rounds to every channel sorts them by importance and cuts nothing: the same function
    permuted = thin(split, interfaces, 0.99)
    assert all(len(k) == n for k, n in zip(permuted.kept, [16, 16, 16, 32, 32, 64, 64, 64]))
    assert any(not torch.equal(k, torch.arange(len(k))) for k in permuted.kept)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(permuted.split(x), split(x), rtol=1e-4, atol=1e-5)
    assert thin(split, interfaces, 1.0).split is split


def test_an_untraceable_interface_is_refused_in_one_line():
    class Concat(torch.nn.Module):  # the head reads its input twice, concatenated: no prefix can be cut
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            x = x.mean((2, 3))
            return self.fc(torch.cat([x, x], 1))

    split = _split(*TEACHERS["small_resnet"])
    blocks = list(split.blocks)[:2]
    from eta.network import StemBlocksHead

    odd = StemBlocksHead(split.stem, blocks, Concat())
    with pytest.raises(EtaError, match=r"^cannot narrow the interfaces of StemBlocksHead: no coupled channel group carries block 0.s input") as err:
        describe_interfaces(odd, (1, 28, 28))
    assert "\n" not in str(err.value)


def test_operator_tokens_carry_the_interface_width():
    arch = arch_from_str("teacher_e0.5_x0.5-id_x0.5-ir_k3_e4_x0.5")
    assert arch_to_str(arch) == "teacher_e0.5_x0.5-id_x0.5-ir_k3_e4_x0.5"
    assert arch_width(arch) == 0.5 and OpSpec.parse("teacher").width == 1.0
    with pytest.raises(EtaError, match="mixes interface widths"):
        arch_width(arch_from_str("teacher_x0.5-teacher"))
    with pytest.raises(EtaError, match=r"interface width 1.5"):
        OpSpec("teacher", width=1.5)


@pytest.fixture(scope="module")
def bound():
    d = tiny_space_dict(widths=[0.5, 1.0])
    d["pool"].append({"family": "teacher", "expansion": [0.5]})
    space = parse_space(d)
    torch.manual_seed(0)
    b = BoundSpace.build(space, in_chans=1, num_classes=10)
    with_batchnorm_statistics(b.teacher, (1, 16, 16))  # not the identity everywhere, as a trained teacher's
    b.rethin()
    return b


def test_a_space_of_two_widths_binds_narrow_operators_in_their_own_sub_space(bound):
    for (w, keep), expect in zip(bound.partitions(), [0.5, 1.0]):
        assert w == expect
        for b, k in enumerate(keep):
            assert k and all(bound.options[b][j].width == w for j in k)
            op = bound.operator(b, bound.options[b][k[0]])
            ins, outs = bound.thinned_shapes[w][b]
            assert op(torch.zeros(2, *ins)).shape[1:] == outs
    assert bound.thinned_shapes[0.5][0][0][0] == channels_at(bound.shapes[0][0][0], 0.5) < bound.shapes[0][0][0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        arch = bound.arch(bound.random_choices(rng))
        arch_width(arch)  # one width per student
    assert bound.space_size() == sum(np.prod([len(k) for k in keep]) for _, keep in bound.partitions())
    # the teacher's own block is distilled again at a narrower interface, but not at its own
    assert OpSpec("teacher", width=0.5) in bound.trainable_specs(0) and OpSpec("teacher") not in bound.trainable_specs(0)


def test_which_channels_a_width_keeps_follows_the_teachers_weights(bound):
    before = [k.clone() for k in bound.kept_channels(0.5)]
    state = {k: v.clone() for k, v in bound.teacher.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    trained = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() > 1 else v) for k, v in state.items()}
    try:
        bound.teacher.load_state_dict(trained)
        bound.rethin()
        assert any(not torch.equal(a, b) for a, b in zip(before, bound.kept_channels(0.5)))
    finally:
        bound.teacher.load_state_dict(state)
        bound.rethin()
    assert all(torch.equal(a, b) for a, b in zip(before, bound.kept_channels(0.5)))


class _Table:
    """Stands in for a latency table: a fixed pseudo-random figure per (workload, shape)."""

    path = "table"

    def get(self, signature, shape, bits):
        return 0.1 + (hash((signature, tuple(shape), bits)) % 1000) / 1000


def test_a_narrower_stem_and_head_enter_the_students_latency_through_block_zero(bound):
    table = _Table()
    base, per_block = option_latency_matrix(bound, table)
    first = [w.signature for w in space_workloads(bound)[:4]]  # a stem and a head at each width, before the operators
    assert first == [workload_signature(kind, part) for w in (1.0, 0.5)
                     for kind, part in (("stem", bound.stem(w)), ("head", bound.head(w)))]
    in_shape = (1, 1, 16, 16)

    def stem_head(width):
        head_in = (1, *bound.thinned_shapes[width][-1][1])
        return (table.get(workload_signature("stem", bound.stem(width)), in_shape, 32)
                + table.get(workload_signature("head", bound.head(width)), head_in, 32))

    assert base == pytest.approx(stem_head(1.0))
    assert stem_head(0.5) != pytest.approx(stem_head(1.0))  # the thinned stem and head are other workloads
    rng = np.random.default_rng(1)
    for _ in range(10):
        choices = bound.random_choices(rng)
        arch = bound.arch(choices)
        direct = stem_head(arch_width(arch))
        for b, spec in enumerate(arch):
            if spec.family != "identity":
                signature = workload_signature(str(spec.with_bits(32)), bound.operator(b, spec))
                direct += table.get(signature, (1, *bound.thinned_shapes[spec.width][b][0]), 32)
        assert base + sum(per_block[b][j] for b, j in enumerate(choices)) == pytest.approx(direct)


def _partitioned(seed):
    rng = np.random.default_rng(seed)
    blocks, options, hidden = 4, 6, 12
    lat = [rng.uniform(0.5, 3.0, options) for _ in range(blocks)]
    layers = [(rng.normal(0, 1, (hidden, blocks * options)), rng.normal(0, 0.5, hidden)),
              (rng.normal(0, 1, (1, hidden)), rng.normal(0, 1, 1))]
    parts = [[[0, 1, 2]] * blocks, [[3, 4, 5]] * blocks]
    return SearchProblem(lat, layers, base_latency=1.0, partitions=parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_solver_over_several_widths_finds_the_optimum_of_their_union(seed):
    p = _partitioned(seed)
    lo, hi = p.min_latency(), p.max_latency()
    for budget in (lo + 0.2 * (hi - lo), lo + 0.6 * (hi - lo)):
        best = exhaustive(p, budget)
        sols = solve_budgets(p, [budget], k_per_budget=2, seed=seed)[float(budget)]
        assert sols[0].objective == pytest.approx(best.objective, abs=1e-9)
        for s in sols:
            assert len({c // 3 for c in s.choices}) == 1  # every block from one width's options
            assert p.latency(s.choices) <= budget + 1e-9
        # each width's own optimum, for phase 3 to finetune beside the overall one
        per_width = solve_budgets(p, [budget], k_per_budget=1, seed=seed, each_partition=True)[float(budget)]
        assert per_width[0].objective == pytest.approx(best.objective, abs=1e-9)
        expect = {}
        for part, (sub, keep) in enumerate(p.sub_problems()):
            if sub.min_latency() <= budget:
                expect[part] = exhaustive(sub, budget).objective
        assert {s.choices[0] // 3: s.objective for s in per_width} == pytest.approx(expect, abs=1e-9)
    got = sample_under_budget(p, hi, 40, np.random.default_rng(seed))
    assert len(got) == 40 and all(len({c // 3 for c in choices}) == 1 for choices in got)
    assert {c[0] // 3 for c in got} == {0, 1}  # both widths sampled


def test_widths_outside_zero_one_are_refused():
    with pytest.raises(EtaError, match=r"interface width 1.5"):
        parse_space(tiny_space_dict(widths=[0.5, 1.5]))


def test_phase1_distils_each_narrower_head_to_the_teachers_logits(bound):
    from eta.bound import splits_for
    from eta.phases.pretrain import pretrain_group
    from eta.student import OperatorBank, split_heads

    splits = splits_for(bound.space)
    last = bound.num_blocks - 1
    state, metrics = pretrain_group(bound, splits, [last], seed=0)[last]
    _, heads = split_heads(state)
    assert heads and "teacher_x0.5" in metrics["candidates"]  # the narrow teacher block is distilled too
    states = [{}] * last + [state]
    bank = OperatorBank(bound, [s if i == last else _fresh(bound, i) for i, s in enumerate(states)])
    x = _images(splits.proxy)
    feats = features_at_blocks(bound.split, x, [last])[last][1]
    logits = bound.split.head(feats)
    narrow = slice_channels(feats, bound.kept_channels(0.5)[-1])
    with torch.no_grad():
        distilled = torch.nn.functional.mse_loss(bank.head(0.5)(narrow), logits)
        sliced = torch.nn.functional.mse_loss(bound.head(0.5)(narrow), logits)
    assert distilled < 0.8 * sliced  # the sliced head lost the dropped channels; distillation makes up part of it


def _fresh(bound, block):
    from eta.student import block_super_ops

    return block_super_ops(bound, block, True).state_dict()


def _images(split):
    from eta.data import batches

    x, _ = next(iter(batches(split, 64, resolution=16)))
    return x


@pytest.mark.slow
def test_a_search_at_half_the_teachers_interface_width_finetunes_and_exports_narrow_students(tmp_path, ray_local):
    """Every phase at one narrower width: students keep half the teacher's channels between blocks, and the
    exported student is that network (its stem reads 1 channel and writes half the teacher's)."""
    import eta
    from eta.export import export_student, load_exported
    from eta.pipeline import Search
    from eta.train import evaluate

    d = tiny_space_dict(widths=[0.5])
    d["pool"].append({"family": "teacher", "expansion": [0.5]})
    d["latency"]["backend"] = "torch"  # TVM's part (tables, export) is width-blind and tested elsewhere; this saves compiling
    search = Search(parse_space(d), runs_dir=tmp_path / "runs", progress=False)
    pareto = search.run_all()
    assert pareto["front"] and all(arch_width(arch_from_str(p["arch"])) == 0.5 for p in pareto["front"])
    best = max(pareto["front"], key=lambda p: p["test_acc"])
    assert best["test_acc"] > 0.5  # ten classes: far above chance after finetuning
    model = eta.load_student(search.run.root, max_latency_ms=best["latency_ms"])
    teacher_channels = search.bound.shapes[0][0][0]
    assert model.blocks[0](torch.zeros(1, teacher_channels // 2, 16, 16)).shape[1] == search.bound.thinned_shapes[0.5][0][1][0]
    assert evaluate(model, search.splits.test, resolution=best["resolution"]) == pytest.approx(best["test_acc"], abs=1e-9)
    export_student(search.run.root, tmp_path / "out", max_latency_ms=best["latency_ms"])
    x = torch.randn(3, 1, best["resolution"], best["resolution"])
    assert torch.allclose(load_exported(tmp_path / "out")(x), model(x), atol=1e-5)


def test_the_uniformly_thinned_teachers_anchor_phase_2_and_the_best_measured_student_under_a_budget_is_found(bound):
    from eta.phases.solve import best_measured, sampled_choices

    rng = np.random.default_rng(4)
    problem = SearchProblem([rng.uniform(0.1, 1.0, len(o)) for o in bound.options], partitions=[k for _, k in bound.partitions()])
    chosen = sampled_choices(bound, problem)
    # the teacher at every hidden width x interface width the space offers, all blocks alike, the teacher itself excepted
    anchors = {tuple(opts.index(OpSpec("teacher", expansion=e, width=w)) for opts in bound.options)
               for e, w in [(1.0, 0.5), (0.5, 0.5), (0.5, 1.0)]}
    assert set(chosen[:3]) == anchors and all(chosen.count(a) == 1 for a in anchors)
    assert bound.teacher_choices() not in chosen
    assert all(len({bound.options[b][j].width for b, j in enumerate(c)}) == 1 for c in chosen)
    samples = [{"choices": list(c), "proxy_acc": float(rng.uniform())} for c in chosen]
    for budget in np.quantile([problem.latency(c) for c in chosen], [0.1, 0.5, 1.0]):
        best = best_measured(samples, problem, budget)
        expect = max((s["proxy_acc"] for s in samples if problem.latency(s["choices"]) <= budget), default=None)
        assert best["proxy_acc"] == expect and problem.latency(best["choices"]) <= budget
    assert best_measured(samples, problem, problem.min_latency() - 1) is None


@pytest.mark.parametrize("each_width", [True, False])
def test_each_budget_hands_phase_3_the_best_measured_student_first_and_with_each_width_the_best_of_every_width(bound, each_width):
    from eta.phases.solve import budget_rows, sampled_choices

    rng = np.random.default_rng(7)
    n = sum(len(o) for o in bound.options)
    layers = [(rng.normal(0, 1, (8, n)), rng.normal(0, 0.5, 8)), (rng.normal(0, 1, (1, 8)), rng.normal(0, 1, 1))]
    problem = SearchProblem([rng.uniform(0.1, 1.0, len(o)) for o in bound.options], layers,
                            partitions=[k for _, k in bound.partitions()])
    chosen = sampled_choices(bound, problem)
    samples = [{"choices": list(c), "arch": arch_to_str(bound.arch(c)), "proxy_acc": float(rng.uniform(0.5, 0.9))} for c in chosen]
    budget = float(np.quantile([problem.latency(c) for c in chosen], 0.6))
    # the solver's answers: one per width, their proxy accuracies drawn like the samples'
    solver = [{"budget_ms": budget, "rank": 0, "choices": [int(k[0]) for k in keep], "proxy_acc": float(rng.uniform(0.5, 0.9)),
               "arch": "", "method": "inlp"} for _, keep in bound.partitions()]
    rows = budget_rows(solver, samples, problem, budget, bound.width_of, each_width)
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    feasible = [s for s in samples if problem.latency(s["choices"]) <= budget]
    pool = solver + feasible
    assert rows[0]["proxy_acc"] == max(r["proxy_acc"] for r in pool)  # the best measured on the proxy, solver or sample
    heads = {bound.width_of(r["choices"]): r["proxy_acc"] for r in rows[: len(bound.widths)]}
    if each_width:
        assert heads == {w: max(r["proxy_acc"] for r in pool if bound.width_of(r["choices"]) == w) for w in bound.widths}
        assert [r["proxy_acc"] for r in rows[1: len(bound.widths)]] == sorted(heads.values(), reverse=True)[1:]
    else:
        assert sum(r["method"] == "sampled" for r in rows) <= 1 and len(rows) <= len(solver) + 1
