"""Operator families and elastic-width super-operators, tested for every registered family (as timm tests
every registered model): operators have the right shapes, slices are exact, sorting is harmless, and
families with an integer lowering can be described."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eta import families
from eta.arch import OpSpec
from eta.elastic import SuperOp, build_super_ops
from eta.errors import EtaError
from eta.families import BlockSlot
from eta.quant.lowering import describe


def _cases():
    """(family name, operators, slot) for every example of every registered family."""
    for fam in families.families():
        for i, (settings, slot) in enumerate(fam.examples()):
            yield pytest.param(fam.name, [OpSpec(fam.name, **s) for s in settings], slot, id=f"{fam.name}-{i}")


def _elastic_cases():
    for p in _cases():
        name, specs, slot = p.values
        fam = families.get(name)
        if any(fam.hidden_widths(s, slot) is not None for s in specs):
            yield p


def build(spec, in_shape, out_shape):
    return families.get(spec.family).build(spec, BlockSlot(in_shape, out_shape))


def make_super(specs, slot, seed=0):
    """A super-operator with random weights AND random BatchNorm statistics, so eval mode is a real test."""
    torch.manual_seed(seed)
    op = SuperOp(specs, slot)
    with torch.no_grad():
        for name, t in op.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.3)
    return op


def batch(in_shape, n=4, seed=1):
    return torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(seed))


def test_every_built_in_family_is_registered_with_examples():
    assert {"ir", "fused", "basic", "bottleneck", "vit", "identity", "teacher"} <= set(families.names())
    assert all(f.examples() for f in families.families() if type(f).__module__.startswith("eta."))


@pytest.mark.parametrize("family,specs,slot", list(_cases()))
def test_operators_fit_their_slot_and_map_its_shapes(family, specs, slot):
    fam = families.get(family)
    for spec in specs:
        assert fam.fits(spec, slot)
        op = fam.build(spec, slot).eval()
        with torch.no_grad():
            assert op(batch(slot.in_shape)).shape == (4, *slot.out_shape)
        assert OpSpec.parse(str(spec)) == spec  # the architecture string round-trips
        if fam.integer:  # a family offered below 32 bits must be described as an integer program
            assert describe(op)[2], spec


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_super_op_slice_equals_extracted_module(family, specs, slot, mode):
    op = make_super(specs, slot)
    x = batch(slot.in_shape)
    for e in op.expansions:
        getattr(op, mode)()
        standalone = op.extract(e)
        assert type(standalone) is type(families.get(family).build(op.spec(e), slot))
        assert standalone.training == (mode == "train")
        y_super, y_alone = op(x, e), standalone(x)
        assert y_super.shape == (4, *slot.out_shape)
        torch.testing.assert_close(y_super, y_alone, atol=1e-6, rtol=1e-6)
        if e in op.widths:  # the slice is the prefix of hidden channels
            expected = op.full.state_dict()
            for group in op.groups:
                for m in group.members:
                    expected[m.name] = expected[m.name].narrow(m.dim, 0, op.widths[e][group.name] * m.unit)
            for name, t in standalone.state_dict().items():
                assert torch.equal(t, expected[name]), name
        if mode == "train":  # running statistics of the slice moved exactly as the standalone module's did
            super_state = op.extract(e).state_dict()
            for k, v in standalone.state_dict().items():
                torch.testing.assert_close(super_state[k], v)


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases()))
def test_fresh_operators_load_extracted_weights(family, specs, slot):
    """Students are rebuilt with the family's builder and loaded with extracted weights: layouts must agree."""
    op = make_super(specs, slot)
    fam = families.get(family)
    for e in op.expansions:
        fresh = fam.build(op.spec(e), slot).eval()
        fresh_state, extracted = fresh.state_dict(), op.extract(e).state_dict()
        assert {k: v.shape for k, v in fresh_state.items()} == {k: v.shape for k, v in extracted.items()}


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases()))
def test_channel_groups_cover_exactly_the_width_dependent_tensors(family, specs, slot):
    """A family's channel groups must list every tensor whose size changes with the hidden width, and no other."""
    fam = families.get(family)
    sliced = [s for s in specs if fam.hidden_widths(s, slot) is not None]
    narrow, wide = (fam.build(s, slot).state_dict() for s in (sliced[0], sliced[-1]))
    changing = {(k, d) for k in wide for d in range(wide[k].dim()) if wide[k].shape[d] != narrow[k].shape[d]}
    listed = {(m.name, m.dim) for g in fam.channel_groups(fam.build(sliced[-1], slot), slot) for m in g.members}
    assert changing == listed, family


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases()))
def test_widths_grow_with_expansion(family, specs, slot):
    op = SuperOp(specs, slot)
    widths = [tuple(op.widths[e][g.name] for g in op.groups) for e in op.expansions if e in op.widths]
    assert widths == sorted(widths) and widths[-1] == tuple(op.full_widths[g.name] for g in op.groups)
    assert all(op.full_widths[g.name] == g.full for g in op.groups)


def test_hidden_widths_of_the_conv_and_vit_families():
    def width(spec, ins, outs):
        return families.get(spec.family).hidden_widths(spec, BlockSlot(ins, outs))

    assert width(OpSpec("ir", 3, 6), (8, 8, 8), (16, 8, 8)) == {"hidden": 48}  # ir expands the input
    assert width(OpSpec("ir", 3, 1), (12, 8, 8), (16, 8, 8)) is None  # no expand conv: not a slice
    assert width(OpSpec("fused", 3, 3), (8, 8, 8), (16, 8, 8)) == {"hidden": 24}
    assert width(OpSpec("basic", 3, 0.5), (32, 8, 8), (8, 8, 8)) == {"hidden": 4}  # basic/bottleneck follow the output, divisor 4
    assert width(OpSpec("bottleneck", 3, 0.25), (8, 8, 8), (64, 8, 8)) == {"hidden1": 16, "hidden2": 16}
    assert width(OpSpec("vit", heads=2, expansion=3), (5, 20), (5, 20)) == {"mlp": 60}
    assert families.get("identity").hidden_widths(OpSpec("identity"), BlockSlot((8, 4, 4), (8, 4, 4))) is None


def test_strides_beyond_two_and_kernel_five_keep_shapes():
    for spec in [OpSpec("ir", 3, 1), OpSpec("ir", 5, 4), OpSpec("fused", 3, 2), OpSpec("basic", 5, 1), OpSpec("bottleneck", 3, 1)]:
        y = build(spec, (8, 16, 16), (8, 4, 4)).eval()(torch.randn(2, 8, 16, 16))
        assert y.shape == (2, 8, 4, 4), spec


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases())[1::3])
def test_sort_channels_preserves_function_and_ranks_by_importance(family, specs, slot):
    op = make_super(specs, slot)
    x = batch(slot.in_shape)
    tensors = op.full.state_dict(keep_vars=True)
    readers = [(g.reader.name, g.reader.dim) for g in op.groups]

    def importance(name, dim):
        return tensors[name].detach().abs().movedim(dim, 0).flatten(1).sum(1)

    # follow the most important channel of each group through a per-channel (1-D) tensor of that group
    markers = [next(m.name for m in g.members if tensors[m.name].dim() == 1) for g in op.groups]
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
    op = make_super([OpSpec("ir", 3, 2), OpSpec("ir", 3, 4)], BlockSlot((8, 8, 8), (8, 8, 8)))
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


@pytest.mark.parametrize("family,specs,slot", list(_elastic_cases())[1::3])
def test_narrow_training_touches_only_the_prefix(family, specs, slot):
    op = make_super(specs, slot).train()
    e = next(e for e in op.expansions if e in op.widths and op.widths[e] != op.full_widths)
    widths = op.widths[e]
    stats_before = {k: v.clone() for k, v in op.full.state_dict().items() if "running" in k}
    op(batch(slot.in_shape), e).square().mean().backward()
    tensors = op.full.state_dict(keep_vars=True)
    for group in op.groups:
        width = widths[group.name]
        for name, dim in ((m.name, m.dim) for m in group.members):
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
    assert torch.equal(build(OpSpec("identity"), (8, 4, 4), (8, 4, 4))(x), x)
    with pytest.raises(EtaError, match="identity cannot replace"):
        build(OpSpec("identity"), (8, 4, 4), (16, 4, 4))
    with pytest.raises(EtaError, match="integer stride"):
        build(OpSpec("ir", 3, 4), (8, 8, 8), (8, 3, 3))
    with pytest.raises(EtaError, match="integer stride"):
        build(OpSpec("basic", 3, 1), (8, 4, 4), (8, 8, 8))
    with pytest.raises(EtaError, match="odd kernel"):
        build(OpSpec("fused", 2, 4), (8, 8, 8), (8, 8, 8))
    with pytest.raises(EtaError, match="not divisible by 3 heads"):
        build(OpSpec("vit", heads=3, expansion=2), (5, 16), (5, 16))
    with pytest.raises(EtaError, match="same shape"):
        build(OpSpec("vit", heads=4, expansion=2), (5, 16), (5, 32))
    with pytest.raises(EtaError, match=r"\(C, H, W\)"):
        build(OpSpec("ir", 3, 2), (5, 16), (5, 16))
    with pytest.raises(EtaError, match="teacher"):
        build(OpSpec("teacher"), (8, 4, 4), (8, 4, 4))
    with pytest.raises(EtaError, match="unknown operator family 'mlp'"):
        OpSpec("mlp")
    op = SuperOp([OpSpec("ir", 3, 2), OpSpec("ir", 3, 4)], BlockSlot((8, 4, 4), (8, 4, 4)))
    with pytest.raises(EtaError, match="not one of"):
        op(x, 3)
    with pytest.raises(EtaError, match="not one of"):
        op.extract(6)
    with pytest.raises(EtaError, match="one family and kernel"):
        SuperOp([OpSpec("ir", 3, 2), OpSpec("ir", 5, 4)], BlockSlot((8, 4, 4), (8, 4, 4)))


def test_build_super_ops_groups_by_super_key():
    slot = BlockSlot((8, 8, 8), (8, 8, 8))
    specs = [OpSpec.parse(t) for t in ["ir_k3_e6", "ir_k3_e1", "ir_k5_e4", "ir_k3_e4", "basic_k3_e0.5"]]
    ops = build_super_ops(specs, slot)
    assert list(ops) == ["basic_k3", "ir_k3", "ir_k5"]
    assert ops["ir_k3"].expansions == (1.0, 4.0, 6.0)
    assert ops["ir_k3"].super_key == "ir_k3"
    # a second build loads the first one's weights and computes the same thing (what the solve phase relies on)
    again = build_super_ops(specs, slot)
    again.load_state_dict(ops.state_dict())
    x = batch((8, 8, 8))
    for key in ops:
        for e in ops[key].expansions:
            torch.testing.assert_close(again[key].eval()(x, e), ops[key].eval()(x, e))
    # without elastic width every expansion is its own super-operator
    assert list(build_super_ops(specs, slot, elastic=False)) == ["basic_k3_e0p5", "ir_k3_e1", "ir_k3_e4", "ir_k3_e6", "ir_k5_e4"]


def test_sample_expansion_is_reproducible_and_covers_all():
    op = SuperOp([OpSpec("fused", 3, e) for e in (4, 2, 1)], BlockSlot((8, 4, 4), (8, 4, 4)))
    assert op.expansions == (1.0, 2.0, 4.0)
    draws = [op.sample_expansion(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    gen = torch.Generator().manual_seed(0)
    assert {op.sample_expansion(gen) for _ in range(60)} == set(op.expansions)


def test_elastic_distillation_lowers_loss_at_smallest_and_largest_width():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 8, 1)).eval()
    op = SuperOp([OpSpec("ir", 3, e) for e in (2, 4, 6)], BlockSlot((8, 8, 8), (8, 8, 8)))
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

