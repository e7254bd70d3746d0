"""Candidate operators and elastic-width super-operators: slices are exact, sorting is harmless."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eta.arch import OpSpec
from eta.errors import EtaError
from eta.ops import CHANNEL_GROUPS, SuperOp, build_op, build_super_ops, count_params, hidden_width

# (family, kernel, heads, expansions) — ir includes 1, which has no expand conv and is held apart
FAMILIES = [
    ("ir", 3, 0, (1, 2, 3, 4)),
    ("fused", 5, 0, (1, 2, 4)),
    ("basic", 3, 0, (0.5, 1, 1.5)),
    ("bottleneck", 3, 0, (0.25, 0.5, 1)),
]
# (in_shape, out_shape): same shape, stride 2 with more channels, stride 1 with more channels
CONV_GEOMETRIES = [((8, 8, 8), (8, 8, 8)), ((8, 8, 8), (12, 4, 4)), ((8, 8, 8), (16, 8, 8))]
VIT = ("vit", 0, 4, (1, 2, 4))
VIT_GEOMETRY = ((5, 16), (5, 16))

CASES = [(*fam, *geo) for fam in FAMILIES for geo in CONV_GEOMETRIES] + [(*VIT, *VIT_GEOMETRY)]
CASE_IDS = [f"{c[0]}-{c[4]}->{c[5]}" for c in CASES]


def make_super(family, kernel, heads, expansions, in_shape, out_shape, seed=0):
    """A super-operator with random weights AND random BatchNorm statistics, so eval mode is a real test."""
    torch.manual_seed(seed)
    op = SuperOp(family, kernel, heads, expansions, in_shape, out_shape)
    with torch.no_grad():
        for name, t in op.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.3)
    return op


def batch(in_shape, n=4, seed=1):
    return torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,kernel,heads,expansions,in_shape,out_shape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_super_op_slice_equals_extracted_module(family, kernel, heads, expansions, in_shape, out_shape, mode):
    op = make_super(family, kernel, heads, expansions, in_shape, out_shape)
    x = batch(in_shape)
    for e in op.expansions:
        getattr(op, mode)()
        standalone = op.extract(e)
        assert type(standalone) is type(build_op(op.spec(e), in_shape, out_shape))
        assert standalone.training == (mode == "train")
        y_super, y_alone = op(x, e), standalone(x)
        assert y_super.shape == (4, *out_shape)
        torch.testing.assert_close(y_super, y_alone, atol=1e-6, rtol=1e-6)
        if op.full is not None and type(standalone) is type(op.full):  # the slice is the prefix of hidden channels
            expected = op.full.state_dict()
            for name, dim in (m for g in CHANNEL_GROUPS[family] for m in g.members):
                expected[name] = expected[name].narrow(dim, 0, op.widths[e])
            for name, t in standalone.state_dict().items():
                assert torch.equal(t, expected[name]), name
        if mode == "train":  # running statistics of the slice moved exactly as the standalone module's did
            super_state = op.extract(e).state_dict()
            for k, v in standalone.state_dict().items():
                torch.testing.assert_close(super_state[k], v)


@pytest.mark.parametrize("family,kernel,heads,expansions,in_shape,out_shape", CASES, ids=CASE_IDS)
def test_build_op_shape_and_layout_match_extract(family, kernel, heads, expansions, in_shape, out_shape):
    op = make_super(family, kernel, heads, expansions, in_shape, out_shape)
    for e in op.expansions:
        fresh = build_op(op.spec(e), in_shape, out_shape).eval()
        assert fresh(batch(in_shape)).shape == (4, *out_shape)
        fresh_state, extracted = fresh.state_dict(), op.extract(e).state_dict()
        # students are rebuilt with build_op and loaded with extracted weights: layouts must agree
        assert {k: v.shape for k, v in fresh_state.items()} == {k: v.shape for k, v in extracted.items()}
        assert count_params(fresh) == count_params(op.extract(e))


def test_hidden_widths():
    assert hidden_width(OpSpec("ir", 3, 6), 8, 16) == 48  # ir expands the input
    assert hidden_width(OpSpec("ir", 3, 1), 12, 16) == 12  # no expand conv
    assert hidden_width(OpSpec("fused", 3, 3), 8, 16) == 24
    assert hidden_width(OpSpec("basic", 3, 0.5), 32, 8) == 4  # basic/bottleneck follow the output, divisor 4
    assert hidden_width(OpSpec("bottleneck", 3, 0.25), 8, 64) == 16
    assert hidden_width(OpSpec("vit", heads=2, expansion=3), 20, 20) == 60
    for family, kernel, heads, expansions in FAMILIES + [VIT]:
        shapes = VIT_GEOMETRY if family == "vit" else CONV_GEOMETRIES[1]
        op = SuperOp(family, kernel, heads, expansions, *shapes)
        widths = [op.widths[e] for e in op.expansions]
        assert widths == sorted(widths)
        assert all(w <= op.full_width for e, w in op.widths.items() if not (family == "ir" and e == 1))
    with pytest.raises(EtaError, match="hidden width"):
        hidden_width(OpSpec("identity"), 8, 8)


def test_slices_cover_exactly_the_width_dependent_tensors():
    """CHANNEL_GROUPS must list every tensor whose size changes with the hidden width, and no other."""
    for family, kernel, heads, _ in FAMILIES + [VIT]:
        shapes = VIT_GEOMETRY if family == "vit" else CONV_GEOMETRIES[1]
        narrow = build_op(OpSpec(family, kernel, 2, heads), *shapes).state_dict()
        wide = build_op(OpSpec(family, kernel, 4, heads), *shapes).state_dict()
        changing = {(k, d) for k in wide for d in range(wide[k].dim()) if wide[k].shape[d] != narrow[k].shape[d]}
        listed = {m for g in CHANNEL_GROUPS[family] for m in g.members}
        assert changing == listed, family


def test_strides_beyond_two_and_kernel_five_keep_shapes():
    for spec in [OpSpec("ir", 3, 1), OpSpec("ir", 5, 4), OpSpec("fused", 3, 2), OpSpec("basic", 5, 1), OpSpec("bottleneck", 3, 1)]:
        y = build_op(spec, (8, 16, 16), (8, 4, 4)).eval()(torch.randn(2, 8, 16, 16))
        assert y.shape == (2, 8, 4, 4), spec


@pytest.mark.parametrize("family,kernel,heads,expansions,in_shape,out_shape", CASES[1::3] + CASES[-1:], ids=CASE_IDS[1::3] + CASE_IDS[-1:])
def test_sort_channels_preserves_function_and_ranks_by_importance(family, kernel, heads, expansions, in_shape, out_shape):
    op = make_super(family, kernel, heads, expansions, in_shape, out_shape)
    x = batch(in_shape)
    tensors = op.full.state_dict(keep_vars=True)
    readers = [g.reader for g in CHANNEL_GROUPS[family]]

    def importance(name, dim):
        return tensors[name].detach().abs().movedim(dim, 0).flatten(1).sum(1)

    # follow the most important channel of each group through a per-channel (1-D) tensor of that group
    markers = [next(n for n, _ in g.members if tensors[n].dim() == 1) for g in CHANNEL_GROUPS[family]]
    best_before = [(importance(*r).max().item(), tensors[m][importance(*r).argmax()].item()) for r, m in zip(readers, markers)]
    y_train = op.train()(x)  # moves running statistics, so it comes before the eval-mode reference
    y_eval = op.eval()(x)
    op.sort_channels()
    torch.testing.assert_close(op(x), y_eval, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(op.train()(x), y_train, atol=1e-5, rtol=1e-5)
    for reader, marker, (best_importance, best_marker) in zip(readers, markers, best_before):
        imp = importance(*reader)
        assert torch.all(imp[:-1] >= imp[1:])
        assert imp[0].item() == pytest.approx(best_importance)
        assert tensors[marker][0].item() == best_marker


def test_sort_channels_carries_gradients_and_optimizer_state():
    op = make_super("ir", 3, 0, (2, 4), (8, 8, 8), (8, 8, 8))
    opt = torch.optim.Adam(op.parameters(), lr=1e-3)
    op.train()(batch((8, 8, 8))).square().mean().backward()
    opt.step()
    w = op.full.conv_pw.weight
    before = {"w": w.detach().clone(), "grad": w.grad.clone(), "m": opt.state[w]["exp_avg"].clone()}
    order = op.full.conv_pwl.weight.detach().abs().sum((0, 2, 3)).argsort(descending=True, stable=True)
    op.sort_channels(optimizer=opt)
    assert torch.equal(w.detach(), before["w"][order])
    assert torch.equal(w.grad, before["grad"][order])
    assert torch.equal(opt.state[w]["exp_avg"], before["m"][order])


@pytest.mark.parametrize("family,kernel,heads,expansions,in_shape,out_shape", CASES[1::3] + CASES[-1:], ids=CASE_IDS[1::3] + CASE_IDS[-1:])
def test_narrow_training_touches_only_the_prefix(family, kernel, heads, expansions, in_shape, out_shape):
    op = make_super(family, kernel, heads, expansions, in_shape, out_shape).train()
    e = next(e for e in op.expansions if 0 < op.widths[e] < op.full_width and f"e{e:g}" not in op.unsliced)
    width = op.widths[e]
    stats_before = {k: v.clone() for k, v in op.full.state_dict().items() if "running" in k}
    op(batch(in_shape), e).square().mean().backward()
    tensors = op.full.state_dict(keep_vars=True)
    for group in CHANNEL_GROUPS[family]:
        for name, dim in group.members:
            t = tensors[name]
            if isinstance(t, nn.Parameter):
                assert t.grad.narrow(dim, width, t.shape[dim] - width).abs().sum() == 0, name
                assert t.grad.narrow(dim, 0, width).abs().sum() > 0, name
            else:  # BatchNorm running statistics: only the prefix moves
                tail = t.shape[dim] - width
                assert torch.equal(t.narrow(dim, width, tail), stats_before[name].narrow(dim, width, tail)), name
                assert not torch.equal(t.narrow(dim, 0, width), stats_before[name].narrow(dim, 0, width)), name


def test_identity_and_impossible_combinations():
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(build_op(OpSpec("identity"), (8, 4, 4), (8, 4, 4))(x), x)
    with pytest.raises(EtaError, match="identity cannot replace"):
        build_op(OpSpec("identity"), (8, 4, 4), (16, 4, 4))
    with pytest.raises(EtaError, match="integer stride"):
        build_op(OpSpec("ir", 3, 4), (8, 8, 8), (8, 3, 3))
    with pytest.raises(EtaError, match="integer stride"):
        build_op(OpSpec("basic", 3, 1), (8, 4, 4), (8, 8, 8))
    with pytest.raises(EtaError, match="odd kernel"):
        build_op(OpSpec("fused", 2, 4), (8, 8, 8), (8, 8, 8))
    with pytest.raises(EtaError, match="not divisible by 3 heads"):
        build_op(OpSpec("vit", heads=3, expansion=2), (5, 16), (5, 16))
    with pytest.raises(EtaError, match="same shape"):
        build_op(OpSpec("vit", heads=4, expansion=2), (5, 16), (5, 32))
    with pytest.raises(EtaError, match=r"\(C, H, W\)"):
        build_op(OpSpec("ir", 3, 2), (5, 16), (5, 16))
    with pytest.raises(EtaError, match="teacher"):
        build_op(OpSpec("teacher"), (8, 4, 4), (8, 4, 4))
    op = SuperOp("ir", 3, 0, (2, 4), (8, 4, 4), (8, 4, 4))
    with pytest.raises(EtaError, match="not one of"):
        op(x, 3)
    with pytest.raises(EtaError, match="not one of"):
        op.extract(6)


def test_build_super_ops_groups_by_super_key():
    specs = [OpSpec.parse(t) for t in ["ir_k3_e6", "ir_k3_e1", "ir_k5_e4", "ir_k3_e4_w8", "basic_k3_e0.5", "id", "teacher"]]
    ops = build_super_ops(specs, (8, 8, 8), (8, 8, 8))
    assert list(ops) == ["basic_k3", "ir_k3", "ir_k5"]
    assert ops["ir_k3"].expansions == (1.0, 4.0, 6.0)
    assert ops["ir_k3"].super_key == "ir_k3"
    # a second build loads the first one's weights and computes the same thing (what phase 2 relies on)
    again = build_super_ops(specs, (8, 8, 8), (8, 8, 8))
    again.load_state_dict(ops.state_dict())
    x = batch((8, 8, 8))
    for key in ops:
        for e in ops[key].expansions:
            torch.testing.assert_close(again[key].eval()(x, e), ops[key].eval()(x, e))
    assert len(build_super_ops([OpSpec("identity"), OpSpec("teacher")], (8, 8, 8), (8, 8, 8))) == 0


def test_sample_expansion_is_reproducible_and_covers_all():
    op = SuperOp("fused", 3, 0, (4, 2, 1), (8, 4, 4), (8, 4, 4))
    assert op.expansions == (1.0, 2.0, 4.0)
    draws = [op.sample_expansion(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    gen = torch.Generator().manual_seed(0)
    assert {op.sample_expansion(gen) for _ in range(60)} == set(op.expansions)


def test_elastic_distillation_lowers_loss_at_smallest_and_largest_width():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 8, 1)).eval()
    op = SuperOp("ir", 3, 0, (2, 4, 6), (8, 8, 8), (8, 8, 8))
    opt = torch.optim.Adam(op.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x_held = batch((8, 8, 8), n=64, seed=123)
    with torch.no_grad():
        y_held = target(x_held)

    def held_loss(e):
        with torch.no_grad():
            return F.mse_loss(op.train()(x_held, e), y_held).item()

    small, large = op.expansions[0], op.expansions[-1]
    before = {e: held_loss(e) for e in (small, large)}
    for step in range(100):
        if step % 20 == 0:
            op.sort_channels(optimizer=opt)
        x = torch.randn(32, 8, 8, 8, generator=gen)
        with torch.no_grad():
            y = target(x)
        loss = F.mse_loss(op.train()(x, op.sample_expansion(gen)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {e: held_loss(e) for e in (small, large)}
    for e in (small, large):
        assert after[e] < 0.5 * before[e], (e, before, after)
