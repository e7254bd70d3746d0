"""Teacher-derived narrow operators (eta.narrowing): the teacher's own block with a prefix of its hidden channels.

The acceptance tests of issue 13, part 1: at expansion 1.0 a narrowed block computes exactly the
teacher's block; a functional slice equals the extracted standalone block; sorting is
function-preserving and puts the most important channels first; gradients through a slice reach
only the prefix; any conv block can be narrowed through Torch-Pruning's dependency graph.
"""
from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
import torchvision.models.mobilenetv2 as tv_mbv2
import torchvision.models.resnet as tv_resnet
from timm.layers import BlurPool2d, GluMlp, SwiGLU
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv
from timm.models.vision_transformer import Block, ResPostBlock
from torch import nn

from eta import channels as ch
from eta import narrowing as nw
from eta.arch import OpSpec
from eta.elastic import SuperOp
from eta.errors import EtaError
from eta.families import BlockSlot


# ---------------------------------------------------------------------------------------------
# blocks under test


class ResidualMB(nn.Module):
    """A conv block eta knows nothing about: 1x1 expand, 3x3 conv, 1x1 project, identity skip."""

    def __init__(self, ch=16, hidden=40):
        super().__init__()
        self.expand = nn.Conv2d(ch, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)

    def forward(self, x):
        y = torch.relu(self.bn1(self.expand(x)))
        y = torch.relu(self.bn2(self.conv(y)))
        return self.bn3(self.project(y)) + x


class TwoBranch(nn.Module):
    """Two branches concatenated before the projection: the second branch's channels sit at an offset."""

    def __init__(self, ch=16):
        super().__init__()
        self.a = nn.Conv2d(ch, 12, 3, padding=1)
        self.b = nn.Conv2d(ch, 20, 1)
        self.project = nn.Conv2d(32, ch, 1)

    def forward(self, x):
        return self.project(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _se(rd_ratio=0.25):
    return functools.partial(SqueezeExcite, rd_ratio=rd_ratio)


def _eta_op(family, kernel, expansion, in_shape, out_shape):
    """One of eta's own operators, built by its family."""
    from eta import families
    from eta.arch import OpSpec

    return families.get(family).build(OpSpec(family, kernel=kernel, expansion=expansion), families.BlockSlot(in_shape, out_shape))


IMG = (16, 8, 8)
TOKENS = (9, 32)

CASES = {
    "timm_ir_se": lambda: (InvertedResidual(16, 16, exp_ratio=6, se_layer=_se()), IMG),
    "timm_ir_stride2_k5": lambda: (InvertedResidual(16, 24, dw_kernel_size=5, stride=2, exp_ratio=4), IMG),
    "timm_ir_hardswish_se": lambda: (InvertedResidual(16, 16, exp_ratio=3, act_layer=nn.Hardswish,
                                                      se_layer=functools.partial(SqueezeExcite, gate_layer="hard_sigmoid")), IMG),
    "timm_dsconv": lambda: (DepthwiseSeparableConv(16, 24), IMG),
    "timm_basic": lambda: (BasicBlock(16, 32, stride=2, downsample=downsample_conv(16, 32, 1, stride=2)), IMG),
    "timm_bottleneck": lambda: (Bottleneck(16, 8, downsample=downsample_conv(16, 32, 1)), IMG),
    "tv_basic": lambda: (tv_resnet.BasicBlock(16, 16), IMG),
    "tv_bottleneck": lambda: (tv_resnet.Bottleneck(32, 8, stride=2, downsample=nn.Sequential(
        nn.Conv2d(32, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))), (32, 8, 8)),
    "tv_ir": lambda: (tv_mbv2.InvertedResidual(16, 16, 1, 6), IMG),
    "tv_ir_t1": lambda: (tv_mbv2.InvertedResidual(16, 24, 2, 1), IMG),
    "vit_block": lambda: (Block(32, 4, qkv_bias=True, qk_norm=True), TOKENS),
    "vit_scale_norms_layerscale": lambda: (Block(32, 4, qkv_bias=False, scale_attn_norm=True, scale_mlp_norm=True,
                                                 init_values=0.5), TOKENS),
    "vit_swiglu": lambda: (Block(32, 4, qkv_bias=True, mlp_layer=SwiGLU, act_layer=nn.SiLU), TOKENS),
    "vit_glu": lambda: (Block(32, 4, mlp_ratio=2, mlp_layer=GluMlp, act_layer=nn.Sigmoid), TOKENS),
    "vit_respost": lambda: (ResPostBlock(32, 4, qkv_bias=True), TOKENS),
    "eta_ir": lambda: (_eta_op("ir", 3, 4, IMG, IMG), IMG),
    "eta_fused": lambda: (_eta_op("fused", 3, 2, IMG, (24, 4, 4)), IMG),
    "eta_basic": lambda: (_eta_op("basic", 5, 0.5, IMG, IMG), IMG),
    "eta_bottleneck": lambda: (_eta_op("bottleneck", 3, 0.25, IMG, (32, 4, 4)), IMG),
    "generic_residual": lambda: (ResidualMB(), IMG),
}
NO_HIDDEN = {"timm_dsconv", "tv_ir_t1"}
WITH_GROUPS = [c for c in CASES if c not in NO_HIDDEN]
EXPANSIONS = (0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def _randomise(block: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Non-trivial norms: random affine parameters and BatchNorm running stats from a few training batches."""
    g = torch.Generator().manual_seed(seed)
    for m in block.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    block.train()
    for _ in range(3):
        block(torch.randn(x.shape, generator=g) * 2 + 0.5)
    return block.eval()


def _make(case: str, batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    block, shape = CASES[case]()
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return _randomise(block, x, seed), x


def _groups(case, block, x):
    return nw.describe_block(block, x if case.startswith("generic") else None)


def elastic_teacher(block, expansions, x, name=""):
    """The teacher family's elastic super-operator of ``block`` (as the pretrain phase builds it)."""
    with torch.no_grad():
        out_shape = tuple(block.eval()(x[:1]).shape[1:])
    return SuperOp([OpSpec("teacher", expansion=e) for e in expansions], BlockSlot(tuple(x.shape[1:]), out_shape, block, 0, name))


def narrowed(block, widths, groups=None):
    """The block narrowed to ``widths`` (group widths, or an expansion of the teacher's own width)."""
    groups = nw.describe_block(block) if groups is None else groups
    return ch.narrow_block(block, groups, nw.hidden_widths(groups, widths) if isinstance(widths, float) else widths)


def _prefix_index(size: int, member: ch.Member, full: int, width: int) -> torch.Tensor:
    return torch.arange(size).reshape(member.chunks, full, member.unit)[:, :width].flatten()


# ---------------------------------------------------------------------------------------------
# full width is the teacher


@pytest.mark.parametrize("case", list(CASES))
def test_full_width_computes_the_teacher_block(case):
    block, x = _make(case)
    groups = _groups(case, block, x)
    assert (len(groups) == 0) == (case in NO_HIDDEN)
    with torch.no_grad():
        want = block(x)
        narrow = narrowed(block, 1.0, groups)
        assert type(narrow) is type(block)
        torch.testing.assert_close(narrow(x), want, atol=1e-5, rtol=0)
        elastic = elastic_teacher(block, EXPANSIONS, x).eval()
        torch.testing.assert_close(elastic(x, 1.0), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(elastic.extract(1.0)(x), want, atol=1e-5, rtol=0)


def test_full_width_check_can_fail():
    """The comparison above sees a wrong narrowing: a permuted channel without its reader changes the output."""
    block, x = _make("timm_ir_se")
    bad = narrowed(block, 1.0)
    with torch.no_grad():
        bad.conv_pw.weight.copy_(bad.conv_pw.weight.roll(1, 0))
        assert (bad(x) - block(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# slices equal their standalone blocks


@pytest.mark.parametrize("case", list(CASES))
def test_functional_slice_equals_extracted_block(case):
    block, x = _make(case)
    elastic = elastic_teacher(block, EXPANSIONS, x)
    elastic.sort_channels()
    for e in EXPANSIONS:
        with torch.no_grad():
            elastic.eval()
            torch.testing.assert_close(elastic(x, e), elastic.extract(e)(x), atol=1e-5, rtol=1e-5)
        # train mode: batch statistics of the prefix, and running stats of the full block's prefix only
        elastic.train()
        standalone = elastic.extract(e)
        assert standalone.training
        before = {k: v.clone() for k, v in elastic.full.state_dict().items()}
        with torch.no_grad():
            torch.testing.assert_close(elastic(x, e), standalone(x), atol=1e-5, rtol=1e-5)
        if e not in elastic.widths:  # expansion 1: the teacher's block itself, beside the super-operator
            continue
        after_full = ch.sliced_tensors(elastic.full, elastic.groups, elastic.widths[e])
        for k, v in standalone.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(after_full[k], v, atol=1e-6, rtol=1e-6)
        outside = {k: v for k, v in elastic.full.state_dict().items() if k.endswith("running_mean")}
        for g in elastic.groups:
            w = elastic.widths[e][g.name]
            for m in g.members:
                if m.name in outside:  # channels beyond the prefix kept their statistics
                    torch.testing.assert_close(outside[m.name][w:], before[m.name][w:])


@pytest.mark.parametrize("case", WITH_GROUPS)
def test_narrow_block_state_matches_slices_and_module_attributes(case):
    block, x = _make(case)
    groups = _groups(case, block, x)
    widths = nw.hidden_widths(groups, 0.5)
    narrow = narrowed(block, widths, groups)
    sliced = ch.sliced_tensors(block, groups, widths)
    ch.check_slice_layout(narrow, sliced)
    ch.check_slice_layout(ch.narrow_meta(block, groups, widths), sliced)
    for k, v in narrow.state_dict().items():
        torch.testing.assert_close(v, sliced[k])


def test_slice_layout_check_catches_a_mismatch():
    block, x = _make("timm_basic")
    groups = nw.describe_block(block)
    narrow = narrowed(block, 0.5, groups)
    sliced = ch.sliced_tensors(block, groups, nw.hidden_widths(groups, 0.75))
    with pytest.raises(EtaError, match="conv1.weight"):
        ch.check_slice_layout(narrow, sliced)
    narrow.conv2.in_channels = 99
    with pytest.raises(EtaError, match="conv2"):
        ch.check_slice_layout(narrow, ch.sliced_tensors(block, groups, nw.hidden_widths(groups, 0.5)))


# ---------------------------------------------------------------------------------------------
# sorting


@pytest.mark.parametrize("case", WITH_GROUPS)
def test_sorting_preserves_the_function_and_ranks_the_prefix(case):
    block, x = _make(case)
    groups = _groups(case, block, x)
    with torch.no_grad():
        want = block(x)
    before = {g.name: ch.l1_importance(block, g) for g in groups}
    orders = ch.sort_channels(block, groups)
    with torch.no_grad():
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    for g in groups:
        after = ch.l1_importance(block, g)
        torch.testing.assert_close(after, before[g.name].sort(descending=True).values)
        torch.testing.assert_close(after, before[g.name][orders[g.name]])
        # a half-width prefix holds exactly the highest-ranked units
        k = max(1, g.full // 2)
        assert set(orders[g.name][:k].tolist()) == set(before[g.name].topk(k).indices.tolist())
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.values())  # it really moved channels


def test_sorting_moves_gradients_and_optimizer_state_along():
    block, x = _make("vit_block")
    block.train()
    groups = nw.describe_block(block)
    opt = torch.optim.Adam(block.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
    qkv = block.attn.qkv.weight
    fc1 = block.mlp.fc1.weight
    old = {"grad": qkv.grad.clone(), "avg": opt.state[qkv]["exp_avg"].clone(), "fc1_avg": opt.state[fc1]["exp_avg_sq"].clone()}
    orders = ch.sort_channels(block, groups, optimizer=opt)
    heads, hd = block.attn.num_heads, block.attn.head_dim
    rows = torch.arange(3 * heads * hd).reshape(3, heads, hd)[:, orders["heads"]].flatten()
    torch.testing.assert_close(qkv.grad, old["grad"][rows])
    torch.testing.assert_close(opt.state[qkv]["exp_avg"], old["avg"][rows])
    torch.testing.assert_close(opt.state[fc1]["exp_avg_sq"], old["fc1_avg"][orders["mlp"]])


def test_taylor_importance_needs_gradients_and_ranks_by_them():
    block, x = _make("timm_bottleneck")
    groups = nw.describe_block(block)
    with pytest.raises(EtaError, match="gradients"):
        ch.taylor_importance(block, groups[0])
    with torch.no_grad():
        want = block(x)
    block(x).square().mean().backward()
    scores = {g.name: ch.taylor_importance(block, g) for g in groups}
    assert all(s.shape == (g.full,) and (s > 0).any() for g, s in zip(groups, scores.values()))
    orders = ch.sort_channels(block, groups, importance=ch.taylor_importance)
    for g in groups:
        assert torch.equal(orders[g.name], torch.argsort(scores[g.name], descending=True, stable=True))
    with torch.no_grad():
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_importance_is_pluggable():
    block, x = _make("timm_basic")
    groups = nw.describe_block(block)
    reverse = lambda blk, g: torch.arange(g.full, dtype=torch.float)  # noqa: E731 - last channel most important
    orders = ch.sort_channels(block, groups, importance=reverse)
    assert torch.equal(orders["mid"], torch.arange(groups[0].full).flip(0))


# ---------------------------------------------------------------------------------------------
# narrower blocks


@pytest.mark.parametrize("case", WITH_GROUPS)
def test_half_width_is_smaller_and_shaped_right(case):
    block, x = _make(case)
    groups = _groups(case, block, x)
    widths = nw.hidden_widths(groups, 0.5)
    narrow = narrowed(block, widths, groups)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in block.parameters())
    tensors = narrow.state_dict()
    for g in groups:
        assert widths[g.name] < g.full
        for m in g.members:
            assert tensors[m.name].shape[m.dim] == m.chunks * widths[g.name] * m.unit
    with torch.no_grad():
        assert narrow(x).shape == block(x).shape
    for mod in narrow.modules():  # size attributes follow the tensors
        if isinstance(mod, nn.Conv2d):
            assert tuple(mod.weight.shape[:2]) == (mod.out_channels, mod.in_channels // mod.groups)
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.num_features == mod.running_mean.numel()
        if isinstance(mod, nn.Linear):
            assert tuple(mod.weight.shape) == (mod.out_features, mod.in_features)


def test_vit_narrowed_by_heads_keeps_head_dim():
    torch.manual_seed(0)
    block = Block(64, 8, qkv_bias=True, qk_norm=True).eval()
    x = torch.randn(2, 10, 64)
    groups = nw.describe_block(block)
    heads = next(g for g in groups if g.heads)
    assert heads.full == 8 and heads.owner == "attn"
    widths = nw.hidden_widths(groups, 1.0, heads=2)
    assert widths == {"heads": 2, "mlp": 256}
    narrow = narrowed(block, widths, groups)
    attn = narrow.attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim, attn.scale) == (2, 8, 16, block.attn.scale)
    assert (attn.qkv.out_features, attn.proj.in_features) == (48, 16)
    assert attn.q_norm.normalized_shape == (8,)
    with torch.no_grad():
        y = narrow(x)
    assert y.shape == x.shape
    # the kept heads are the teacher's first two heads: q, k and v rows of heads 0-1 in each chunk
    rows = torch.arange(3 * 64).reshape(3, 8, 8)[:, :2].flatten()
    torch.testing.assert_close(attn.qkv.weight, block.attn.qkv.weight[rows])
    half = nw.hidden_widths(groups, 0.5)
    assert half == {"heads": 4, "mlp": 128}
    # removing heads is what it says: the output equals the teacher with the other heads' projection columns zeroed
    masked = copy.deepcopy(block)
    with torch.no_grad():
        masked.attn.proj.weight[:, 16:] = 0
        only_heads = narrowed(block, {"heads": 2}, groups)
        torch.testing.assert_close(only_heads(x), masked(x), atol=1e-5, rtol=1e-5)


def test_width_arithmetic():
    g = ch.ChannelGroup("g", (ch.Member("w", 0),), ch.Member("w", 0), 96)
    h = ch.ChannelGroup("h", (ch.Member("v", 0, 3, 8),), ch.Member("v", 0, 3, 8), 12, heads=True)
    assert nw.hidden_widths([g, h], 1.0) == {"g": 96, "h": 12}
    assert nw.hidden_widths([g, h], 0.25) == {"g": 24, "h": 3}
    assert nw.hidden_widths([g, h], 0.5) == {"g": 48, "h": 6}
    assert nw.hidden_widths([g, h], 0.01) == {"g": 4, "h": 1}  # at least one divisor, at least one head
    odd = ch.ChannelGroup("o", (ch.Member("w", 0),), ch.Member("w", 0), 10)
    assert nw.hidden_widths([odd], 1.0) == {"o": 10}
    assert nw.hidden_widths([odd], 0.9) == {"o": 10}  # capped at the teacher's width
    assert nw.hidden_widths([odd], 0.5) == {"o": 8}
    for bad in (0, -0.5, 1.5):
        with pytest.raises(EtaError, match="expansion"):
            nw.hidden_widths([g], bad)
    with pytest.raises(EtaError, match="heads"):
        nw.hidden_widths([h], 0.5, heads=13)


def test_widths_are_checked():
    block, _ = _make("timm_basic")
    groups = nw.describe_block(block)
    with pytest.raises(EtaError, match="unknown hidden groups"):
        narrowed(block, {"nope": 4}, groups)
    with pytest.raises(EtaError, match="outside"):
        narrowed(block, {"mid": 0}, groups)
    elastic = elastic_teacher(block, [0.5, 1.0], torch.zeros(1, *IMG))
    with pytest.raises(EtaError, match="expansion 0.75"):
        elastic(torch.zeros(1, *IMG), 0.75)


# ---------------------------------------------------------------------------------------------
# gradients reach only the prefix


@pytest.mark.parametrize("case", ["timm_ir_se", "tv_bottleneck", "vit_block", "eta_bottleneck", "generic_residual"])
def test_gradients_through_a_slice_reach_only_the_prefix(case):
    block, x = _make(case)
    elastic = elastic_teacher(block, [0.5, 0.75], x).train()  # the widest (0.75) holds the weights; 0.5 is its prefix
    elastic(x, 0.5).square().mean().backward()
    params = dict(elastic.full.named_parameters())
    checked = 0
    for g in elastic.groups:
        w = elastic.widths[0.5][g.name]
        for m in g.members:
            p = params.get(m.name)
            if p is None:
                continue
            inside = _prefix_index(p.shape[m.dim], m, g.full, w)
            mask = torch.zeros(p.shape[m.dim], dtype=torch.bool)
            mask[inside] = True
            grad = p.grad.movedim(m.dim, 0)
            assert grad[~mask].abs().max() == 0, f"{m.name}: gradient outside the prefix"
            assert grad[mask].abs().max() > 0, f"{m.name}: no gradient inside the prefix"
            checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------------------------
# the generic path (Torch-Pruning)


def test_generic_path_narrows_an_unknown_residual_block_and_keeps_its_interface():
    pytest.importorskip("torch_pruning")
    block, x = _make("generic_residual")
    groups = nw.describe_block(block, x)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"expand", "conv"}
    assert set(by_name["expand"].members) == {ch.Member("expand.weight", 0), ch.Member("bn1.weight", 0), ch.Member("bn1.bias", 0),
                                               ch.Member("bn1.running_mean", 0), ch.Member("bn1.running_var", 0),
                                               ch.Member("conv.weight", 1)}
    assert ch.Member("conv.bias", 0) in by_name["conv"].members and by_name["conv"].reader == ch.Member("project.weight", 1)
    interface = {("expand.weight", 1), ("project.weight", 0), ("bn3.weight", 0)}
    assert not interface & {(m.name, m.dim) for g in groups for m in g.members}
    narrow = narrowed(block, 0.5, groups)
    sizes = (narrow.expand.in_channels, narrow.expand.out_channels, narrow.conv.out_channels, narrow.project.out_channels)
    assert sizes == (16, 20, 20, 16)
    with torch.no_grad():
        assert narrow(x).shape == x.shape
    nw.check_interface(block, groups, x)


def test_generic_path_agrees_with_the_hand_written_inverted_residual():
    pytest.importorskip("torch_pruning")
    block, x = _make("timm_ir_se")
    hand = nw.describe_block(block)
    traced = {g.name: g for g in nw.describe_traced(block, x)}
    assert set(traced["conv_pw"].members) == set(hand[0].members)
    assert traced["conv_pw"].reader == hand[0].reader
    # the SE's own reduced width is hidden too; tracing finds it, the hand-written description leaves it at full width
    assert set(traced) == {"conv_pw", "se.conv_reduce"}


def test_generic_path_leaves_output_and_offset_channels_alone(caplog):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24))
    x = torch.randn(2, *IMG)
    groups = nw.describe_block(_randomise(plain, x), x)
    assert [g.name for g in groups] == ["0"]  # the last conv's 24 outputs are the block's output
    two = _randomise(TwoBranch(), x)
    with caplog.at_level(logging.INFO, logger="eta.narrowing"):
        groups = nw.describe_block(two, x)
    # both branches feed the projection through a concat: a prefix of either is not a prefix of its columns
    assert groups == ()
    assert "channels of 'a' stay at full width" in caplog.text and "channels of 'b' stay at full width" in caplog.text
    elastic = elastic_teacher(two, [0.5, 1.0], x).eval()
    with torch.no_grad():
        torch.testing.assert_close(elastic(x, 0.5), two(x), atol=1e-5, rtol=0)


def test_interface_check_refuses_a_wrong_description():
    block, x = _make("generic_residual")
    wrong = ch.ChannelGroup("out", (ch.Member("project.weight", 0), ch.Member("bn3.weight", 0), ch.Member("bn3.bias", 0),
                                   ch.Member("bn3.running_mean", 0), ch.Member("bn3.running_var", 0)),
                           ch.Member("project.weight", 0), 16)
    with pytest.raises(EtaError, match="narrowing its hidden groups"):
        nw.check_interface(block, (wrong,), x, name="blocks.3")


# ---------------------------------------------------------------------------------------------
# refusals: one line naming the block and the reason


def test_refusals_name_the_block_and_the_reason():
    resnext = Bottleneck(64, 16, cardinality=4, base_width=16)
    with pytest.raises(EtaError, match=r"block 'layer1.0' \(Bottleneck\).*grouped conv \(4 groups\)"):
        nw.describe_block(resnext, name="layer1.0")
    blur = InvertedResidual(16, 16, stride=2, exp_ratio=4, aa_layer=BlurPool2d)
    with pytest.raises(EtaError, match="aa.*BlurPool2d"):
        nw.describe_block(blur)
    with pytest.raises(EtaError, match="example input") as info:
        nw.describe_block(ResidualMB())
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# whole teachers: every block of eta's zoo and of timm families


@pytest.mark.parametrize("teacher", ["tiny_mbnet", "small_resnet", "mobilenetv3_small_050", "efficientnet_b0", "resnet26",
                                     "vit_tiny_patch16_224"])
def test_every_block_of_a_teacher_narrows(teacher):
    from eta import zoo
    from eta.teachers import build_teacher, split_teacher

    try:
        from eta.quant import lowering
    except ImportError:
        lowering = None
    torch.manual_seed(0)
    if teacher in ("tiny_mbnet", "small_resnet"):
        model, x = getattr(zoo, teacher)(num_classes=10, in_chans=1), torch.randn(2, 1, 32, 32)
    elif teacher.startswith("vit"):
        model, x = build_teacher(teacher, num_classes=10, in_chans=3, kwargs={"img_size": 32}), torch.randn(2, 3, 32, 32)
    else:
        model, x = build_teacher(teacher, num_classes=10, in_chans=3), torch.randn(2, 3, 64, 64)
    split = split_teacher(model.eval(), "auto").eval()
    h = split.stem(x)
    narrowed = 0
    for name, block in zip(split.block_names, split.blocks):
        with torch.no_grad():
            want = block(h)
        elastic = elastic_teacher(block, [0.5, 1.0], h, name).eval()
        with torch.no_grad():
            torch.testing.assert_close(elastic(h, 1.0), want, atol=1e-5, rtol=0)
            half = elastic.extract(0.5)
            torch.testing.assert_close(elastic(h, 0.5), half(h), atol=1e-4, rtol=1e-4)
        narrowed += bool(elastic.groups)
        if lowering is not None:  # same classes and consistent attributes: the integer lowering treats it as the teacher's
            assert lowering.lowerable(half) == lowering.lowerable(block), name
        h = want
    assert narrowed >= len(split.blocks) - 2  # at most the t=1 / depthwise-separable blocks have no hidden width
