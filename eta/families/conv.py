"""Convolutional operator families: ``ir`` (MBConv), ``fused`` (fused-MBConv), ``basic`` and ``bottleneck``.

timm's ``InvertedResidual`` / ``EdgeResidual`` round the hidden width to a multiple of 8 (at least
8) and timm's ResNet blocks tie it to the output width with a fixed 3x3 kernel, so neither can
hold an arbitrary slice: the modules here keep timm's layer names (``conv_pw``/``bn1``/...,
``conv1``/``bn1``/``act1``/...) and timm's ``BatchNormAct2d``. ``ir`` at expansion 1 has no
expand conv and is timm's ``DepthwiseSeparableConv`` (not a slice of a wider inverted residual).

Hidden widths use ``timm.layers.make_divisible(v, divisor=4)``: multiples of 4 keep tiny networks
(8-16 channels) from collapsing several expansions onto one width, as divisor 8 would. Every module
here, and timm's own inverted residuals that teachers are made of, has an integer lowering.
"""
from __future__ import annotations

from timm.layers import BatchNormAct2d, create_act_layer, make_divisible
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck as TimmBottleneck
from torch import nn

from ..errors import EtaError
from ..quant.lowering import INPUT, OUTPUT, Step, Term, norm_activation, projection_shortcut, register_lowering, require_absent_or_identity
from ..channels import ChannelGroup, Member
from ..narrowing import register_describer
from .base import BlockSlot, Family
from .registry import get, register

CHANNEL_DIVISOR = 4


# ---------------------------------------------------------------------------------------------
# modules


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # padding k//2 makes an odd kernel map H to H/stride for every stride that divides H
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """ResNet projection shortcut, only where the identity would not fit."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))


class InvertedResidual(nn.Module):
    """MBConv with an exact hidden width; layer names follow timm's ``InvertedResidual``."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self.has_skip = stride == 1 and in_ch == out_ch
        self.conv_pw = _conv(in_ch, hidden, 1)
        self.bn1 = BatchNormAct2d(hidden, act_layer=act_layer)
        self.conv_dw = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self.bn2 = BatchNormAct2d(hidden, act_layer=act_layer)
        self.conv_pwl = _conv(hidden, out_ch, 1)
        self.bn3 = BatchNormAct2d(out_ch, apply_act=False)

    def forward(self, x):
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.has_skip else y


class FusedMBConv(nn.Module):
    """Fused-MBConv with an exact hidden width; layer names follow timm's ``EdgeResidual``."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self.has_skip = stride == 1 and in_ch == out_ch
        self.conv_exp = _conv(in_ch, hidden, kernel, stride)
        self.bn1 = BatchNormAct2d(hidden, act_layer=act_layer)
        self.conv_pwl = _conv(hidden, out_ch, 1)
        self.bn2 = BatchNormAct2d(out_ch, apply_act=False)

    def forward(self, x):
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return y + x if self.has_skip else y


class BasicBlock(nn.Module):
    """ResNet basic block with any kernel and hidden width; layer names follow timm's ``BasicBlock``."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self.conv1 = _conv(in_ch, hidden, kernel, stride)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv(hidden, out_ch, kernel)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck with any kernel and hidden width; layer names follow timm's ``Bottleneck``."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer=nn.ReLU):
        super().__init__()
        self.conv1 = _conv(in_ch, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv(hidden, hidden, kernel, stride)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv3 = _conv(hidden, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.act3 = create_act_layer(act_layer, inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.act3(self.bn3(self.conv3(y)) + shortcut)


def depthwise_separable(in_ch: int, out_ch: int, kernel: int, stride: int, act_layer=nn.ReLU) -> nn.Module:
    """timm's ``DepthwiseSeparableConv`` padded like the other operators (``kernel // 2``)."""
    op = DepthwiseSeparableConv(in_ch, out_ch, dw_kernel_size=kernel, stride=stride, act_layer=act_layer)
    # timm pads (stride-1 + kernel-1)//2, which equals kernel//2 only for stride <= 2
    op.conv_dw.padding = (kernel // 2, kernel // 2)
    return op


# ---------------------------------------------------------------------------------------------
# which tensors are indexed by hidden channels


def _bn(name: str) -> tuple[Member, ...]:
    return tuple(Member(f"{name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var"))


def hidden_group(name: str, producer: str, bn: str, consumer: str, full: int, carriers: tuple[Member, ...] = ()) -> ChannelGroup:
    """The hidden channels ``producer`` writes (rows), ``bn`` normalises, ``carriers`` (a depthwise conv and its
    norm) carry, and ``consumer`` reads (columns); ranked by the consumer's weights."""
    reader = Member(f"{consumer}.weight", 1)
    return ChannelGroup(name, (Member(f"{producer}.weight", 0), *_bn(bn), *carriers, reader), reader, int(full))


def conv_geometry(spec, in_shape, out_shape) -> tuple[int, int, int]:
    """(in channels, out channels, stride) of a conv operator mapping (C,H,W) to (C',H',W')."""
    if len(in_shape) != 3 or len(out_shape) != 3:
        raise EtaError(f"operator '{spec}' needs (C, H, W) feature maps, got {tuple(in_shape)} -> {tuple(out_shape)}")
    (c_in, h_in, w_in), (c_out, h_out, w_out) = in_shape, out_shape
    if min(h_out, w_out) < 1 or h_in % h_out or w_in % w_out or h_in // h_out != w_in // w_out:
        raise EtaError(f"operator '{spec}' cannot map {tuple(in_shape)} to {tuple(out_shape)}: "
                       "the spatial size must shrink by one integer stride")
    if spec.kernel < 1 or spec.kernel % 2 == 0:
        raise EtaError(f"operator '{spec}' needs an odd kernel size, got {spec.kernel}")
    return c_in, c_out, h_in // h_out


class ConvFamily(Family):
    """A conv family: a module class, the channel count its expansion multiplies, its hidden channel groups."""

    fields = ("kernel", "expansion")
    integer = True
    module: type = nn.Module
    reference = "in"  # expansion multiplies the input ("in") or output ("out") channels
    group_names: tuple[str, ...] = ("hidden",)  # every group follows the one hidden width

    def fits(self, spec, slot: BlockSlot) -> bool:
        ins, outs = slot.in_shape, slot.out_shape
        return len(ins) == 3 and len(outs) == 3 and ins[1] % outs[1] == 0 and ins[1] >= outs[1]

    def hidden_width(self, spec, in_ch: int, out_ch: int) -> int:
        if spec.expansion <= 0:
            raise EtaError(f"operator '{spec}' needs a positive expansion")
        ref = in_ch if self.reference == "in" else out_ch
        return int(make_divisible(ref * spec.expansion, divisor=CHANNEL_DIVISOR))

    def hidden_widths(self, spec, slot: BlockSlot) -> dict[str, int] | None:
        in_ch, out_ch, _ = conv_geometry(spec, slot.in_shape, slot.out_shape)
        width = self.hidden_width(spec, in_ch, out_ch)
        return {name: width for name in self.group_names}

    def build(self, spec, slot: BlockSlot) -> nn.Module:
        in_ch, out_ch, stride = conv_geometry(spec, slot.in_shape, slot.out_shape)
        return self.module(in_ch, out_ch, self.hidden_width(spec, in_ch, out_ch), spec.kernel, stride)

    example_expansions: tuple[float, ...] = (1, 2, 4)

    def examples(self):
        # same shape, stride 2 with more channels, stride 1 with more channels
        geometries = [((8, 8, 8), (8, 8, 8)), ((8, 8, 8), (12, 4, 4)), ((8, 8, 8), (16, 8, 8))]
        return [([{"kernel": 3, "expansion": e} for e in self.example_expansions], BlockSlot(i, o)) for i, o in geometries]


@register
class InvertedResidualFamily(ConvFamily):
    """``ir``: MobileNetV2's inverted residual; expansion 1 has no expand conv (timm's DepthwiseSeparableConv)."""

    name = "ir"
    module = InvertedResidual
    example_expansions = (1, 2, 3, 4)  # 1 has no expand conv and is held apart

    def channel_groups(self, module, slot):
        # conv_pw writes the hidden channels, bn1 normalises them, the depthwise conv_dw and its bn2 carry them
        return (hidden_group("hidden", "conv_pw", "bn1", "conv_pwl", module.conv_pw.out_channels,
                             (Member("conv_dw.weight", 0), *_bn("bn2"))),)

    def hidden_widths(self, spec, slot):
        return None if float(spec.expansion) == 1.0 else super().hidden_widths(spec, slot)

    def build(self, spec, slot):
        if float(spec.expansion) == 1.0:
            in_ch, out_ch, stride = conv_geometry(spec, slot.in_shape, slot.out_shape)
            return depthwise_separable(in_ch, out_ch, spec.kernel, stride)
        return super().build(spec, slot)


@register
class FusedFamily(ConvFamily):
    """``fused``: fused-MBConv (EfficientNetV2), one k×k expand conv then a 1×1 projection."""

    name = "fused"
    module = FusedMBConv

    def channel_groups(self, module, slot):
        return (hidden_group("hidden", "conv_exp", "bn1", "conv_pwl", module.conv_exp.out_channels),)


@register
class BasicFamily(ConvFamily):
    """``basic``: ResNet's basic block; expansion multiplies the output channels."""

    name = "basic"
    module = BasicBlock
    reference = "out"
    example_expansions = (0.5, 1, 1.5)

    def channel_groups(self, module, slot):
        return (hidden_group("hidden", "conv1", "bn1", "conv2", module.conv1.out_channels),)


@register
class BottleneckFamily(ConvFamily):
    """``bottleneck``: ResNet's bottleneck; expansion multiplies the output channels, both inner widths follow it."""

    name = "bottleneck"
    module = Bottleneck
    reference = "out"
    example_expansions = (0.25, 0.5, 1)
    group_names = ("hidden1", "hidden2")

    def channel_groups(self, module, slot):
        full = module.conv1.out_channels
        return (hidden_group("hidden1", "conv1", "bn1", "conv2", full), hidden_group("hidden2", "conv2", "bn2", "conv3", full))


for _name in ("ir", "fused", "basic", "bottleneck"):  # a teacher made of these modules narrows by the same groups
    _family = get(_name)
    register_describer(_family.module, lambda block, label, fam=_family: fam.channel_groups(block, None))


# ---------------------------------------------------------------------------------------------
# integer lowerings of these modules and of timm's inverted residuals and ResNet blocks


@register_lowering(InvertedResidual, TimmInvertedResidual)
def _describe_inverted_residual(module):
    skip = (Term(INPUT),) if getattr(module, "has_skip", False) else ()
    require_absent_or_identity(module, "conv_s2d", "se", "aa", "drop_path")
    convs = {"conv_pw": (module.conv_pw, module.bn1), "conv_dw": (module.conv_dw, module.bn2),
             "conv_pwl": (module.conv_pwl, module.bn3)}
    steps = (Step("h1", (Term(INPUT, "conv_pw"),), norm_activation(module.bn1)),
             Step("h2", (Term("h1", "conv_dw"),), norm_activation(module.bn2)),
             Step(OUTPUT, (Term("h2", "conv_pwl"),) + skip, norm_activation(module.bn3)))
    return "ir", convs, steps


@register_lowering(DepthwiseSeparableConv)
def _describe_depthwise_separable(module):
    skip = (Term(INPUT),) if getattr(module, "has_skip", False) else ()
    require_absent_or_identity(module, "conv_s2d", "aa", "se", "drop_path")
    convs = {"conv_dw": (module.conv_dw, module.bn1), "conv_pw": (module.conv_pw, module.bn2)}
    pw_act = norm_activation(module.bn2)
    first = Step("h1", (Term(INPUT, "conv_dw"),), norm_activation(module.bn1))
    if skip and pw_act != "none":  # activation before the add: requantize, then add as a step of its own
        return "ir", convs, (first, Step("h2", (Term("h1", "conv_pw"),), pw_act), Step(OUTPUT, (Term("h2"),) + skip))
    return "ir", convs, (first, Step(OUTPUT, (Term("h1", "conv_pw"),) + skip, pw_act))


@register_lowering(FusedMBConv)
def _describe_fused(module):
    skip = (Term(INPUT),) if module.has_skip else ()
    convs = {"conv_exp": (module.conv_exp, module.bn1), "conv_pwl": (module.conv_pwl, module.bn2)}
    return "fused", convs, (Step("h1", (Term(INPUT, "conv_exp"),), norm_activation(module.bn1)),
                            Step(OUTPUT, (Term("h1", "conv_pwl"),) + skip, norm_activation(module.bn2)))


@register_lowering(BasicBlock, TimmBasicBlock)
def _describe_basic(module):
    require_absent_or_identity(module, "drop_block", "aa", "se", "drop_path")
    convs = {"conv1": (module.conv1, module.bn1), "conv2": (module.conv2, module.bn2)}
    shortcut = projection_shortcut(module, convs)
    return "basic", convs, (Step("h1", (Term(INPUT, "conv1"),), norm_activation(module.bn1, module.act1)),
                            Step(OUTPUT, (Term("h1", "conv2"), shortcut), norm_activation(module.bn2, module.act2)))


@register_lowering(Bottleneck, TimmBottleneck)
def _describe_bottleneck(module):
    require_absent_or_identity(module, "drop_block", "aa", "se", "drop_path")
    convs = {"conv1": (module.conv1, module.bn1), "conv2": (module.conv2, module.bn2), "conv3": (module.conv3, module.bn3)}
    shortcut = projection_shortcut(module, convs)
    return "bottleneck", convs, (Step("h1", (Term(INPUT, "conv1"),), norm_activation(module.bn1, module.act1)),
                                 Step("h2", (Term("h1", "conv2"),), norm_activation(module.bn2, module.act2)),
                                 Step(OUTPUT, (Term("h2", "conv3"), shortcut), norm_activation(module.bn3, module.act3)))
