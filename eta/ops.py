"""Candidate operators for one teacher block, and the elastic-width super-operators phase 1 trains.

Every operator family except ``identity`` has a hidden width set by its expansion. For each family
and kernel (or head count) one *super-operator* is built at the largest width; a narrower variant
is the prefix of its hidden channels, so training a random prefix each step trains every width at
once, and :meth:`SuperOp.extract` turns any prefix into a standalone module that computes exactly
the same function. Standalone modules are what students are made of; their state-dict layout does
not depend on how they were made (``build_op`` with fresh weights or ``extract``).

Module choices. timm's ``InvertedResidual`` / ``EdgeResidual`` round the hidden width to a multiple
of 8 (at least 8) and timm's ResNet blocks tie it to the output width with a fixed 3x3 kernel, so
neither can hold an arbitrary slice: ``ir`` (expansion != 1), ``fused``, ``basic`` and
``bottleneck`` are small modules here that keep timm's layer names (``conv_pw``/``bn1``/...,
``conv1``/``bn1``/``act1``/...) and timm's ``BatchNormAct2d``. ``ir`` at expansion 1 has no
expand conv and is timm's ``DepthwiseSeparableConv``; ``vit`` is timm's ViT ``Block`` (its MLP
width is set exactly); ``identity`` is ``nn.Identity``.

Hidden widths use ``timm.layers.make_divisible(v, divisor=4)``: multiples of 4 keep tiny networks
(8-16 channels) from collapsing several expansions onto one width, as divisor 8 would.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from timm.layers import BatchNormAct2d, create_act_layer, get_act_layer, make_divisible
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models.vision_transformer import Block
from torch import nn
from torch.func import functional_call

from .arch import OpSpec
from .errors import EtaError

CHANNEL_DIVISOR = 4
CONV_FAMILIES = ("ir", "fused", "basic", "bottleneck")
ELASTIC_FAMILIES = CONV_FAMILIES + ("vit",)


# ---------------------------------------------------------------------------------------------
# widths and shapes


def hidden_width(spec: OpSpec, in_ch: int, out_ch: int) -> int:
    """Hidden channels of ``spec`` between ``in_ch`` and ``out_ch`` (``in_ch`` is the embedding size for vit)."""
    if spec.family not in ELASTIC_FAMILIES:
        raise EtaError(f"operator '{spec}' has no hidden width")
    if spec.expansion <= 0:
        raise EtaError(f"operator '{spec}' needs a positive expansion")
    if spec.family == "ir" and _has_no_expand_conv(spec):
        return in_ch
    ref = out_ch if spec.family in ("basic", "bottleneck") else in_ch
    return int(make_divisible(ref * spec.expansion, divisor=CHANNEL_DIVISOR))


def _has_no_expand_conv(spec: OpSpec) -> bool:
    """MobileNetV2's t=1 block: no 1x1 expand conv, so not a slice of a wider inverted residual."""
    return spec.family == "ir" and float(spec.expansion) == 1.0


def _conv_geometry(spec: OpSpec, in_shape, out_shape) -> tuple[int, int, int]:
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


def _token_width(spec: OpSpec, in_shape, out_shape) -> int:
    """Embedding size of a transformer block mapping (N,C) tokens to the same shape."""
    if len(in_shape) != 2 or tuple(in_shape) != tuple(out_shape):
        raise EtaError(f"operator '{spec}' maps (N, C) tokens to the same shape, got {tuple(in_shape)} -> {tuple(out_shape)}")
    dim = in_shape[1]
    if spec.heads < 1 or dim % spec.heads:
        raise EtaError(f"operator '{spec}': embedding size {dim} is not divisible by {spec.heads} heads")
    return dim


# ---------------------------------------------------------------------------------------------
# standalone operators


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

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer):
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

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer):
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

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer):
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

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int, act_layer):
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


_CONV_OPS = {"ir": InvertedResidual, "fused": FusedMBConv, "basic": BasicBlock, "bottleneck": Bottleneck}


def _depthwise_separable(in_ch: int, out_ch: int, kernel: int, stride: int, act_layer) -> nn.Module:
    op = DepthwiseSeparableConv(in_ch, out_ch, dw_kernel_size=kernel, stride=stride, act_layer=act_layer)
    # timm pads (stride-1 + kernel-1)//2, which equals kernel//2 only for stride <= 2
    op.conv_dw.padding = (kernel // 2, kernel // 2)
    return op


def _vit_block(dim: int, heads: int, hidden: int, act_layer) -> nn.Module:
    # timm sizes the MLP as int(dim * mlp_ratio); the half channel keeps float error from rounding down
    block = Block(dim, heads, mlp_ratio=(hidden + 0.5) / dim, qkv_bias=True, act_layer=act_layer)
    assert block.mlp.fc1.out_features == hidden, (block.mlp.fc1.out_features, hidden)
    return block


def _default_act(family: str, act_layer):
    if act_layer is None:
        return nn.GELU if family == "vit" else nn.ReLU
    return get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer


def build_op(spec: OpSpec, in_shape: tuple, out_shape: tuple, act_layer=None) -> nn.Module:
    """A standalone operator mapping ``in_shape`` to ``out_shape`` (no batch dim); ``spec.bits`` is ignored.

    Conv families take (C,H,W) and stride H_in // H_out; ``vit`` takes (N,C) tokens.
    """
    if spec.family == "teacher":
        raise EtaError("the 'teacher' operator is the teacher's own block; it is not built from an OpSpec")
    if spec.family == "identity":
        if tuple(in_shape) != tuple(out_shape):
            raise EtaError(f"identity cannot replace a block that maps {tuple(in_shape)} to {tuple(out_shape)}")
        return nn.Identity()
    act_layer = _default_act(spec.family, act_layer)
    if spec.family == "vit":
        dim = _token_width(spec, in_shape, out_shape)
        return _vit_block(dim, spec.heads, hidden_width(spec, dim, dim), act_layer)
    in_ch, out_ch, stride = _conv_geometry(spec, in_shape, out_shape)
    if _has_no_expand_conv(spec):
        return _depthwise_separable(in_ch, out_ch, spec.kernel, stride, act_layer)
    return _CONV_OPS[spec.family](in_ch, out_ch, hidden_width(spec, in_ch, out_ch), spec.kernel, stride, act_layer)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# which tensors are indexed by hidden channels


@dataclass(frozen=True)
class ChannelGroup:
    """One set of hidden channels: the (tensor, dim) pairs indexed by it, and the tensor that reads it.

    Slicing takes the same prefix along every member; sorting applies one permutation to all
    members, which leaves the function unchanged. ``reader`` ranks channels by the L1 norm of the
    weights that consume them.
    """

    members: tuple[tuple[str, int], ...]
    reader: tuple[str, int]


def _bn(name: str) -> tuple[tuple[str, int], ...]:
    return tuple((f"{name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var"))


CHANNEL_GROUPS: dict[str, tuple[ChannelGroup, ...]] = {
    "ir": (ChannelGroup((("conv_pw.weight", 0), *_bn("bn1"), ("conv_dw.weight", 0), *_bn("bn2"), ("conv_pwl.weight", 1)),
                        ("conv_pwl.weight", 1)),),
    "fused": (ChannelGroup((("conv_exp.weight", 0), *_bn("bn1"), ("conv_pwl.weight", 1)), ("conv_pwl.weight", 1)),),
    "basic": (ChannelGroup((("conv1.weight", 0), *_bn("bn1"), ("conv2.weight", 1)), ("conv2.weight", 1)),),
    "bottleneck": (
        ChannelGroup((("conv1.weight", 0), *_bn("bn1"), ("conv2.weight", 1)), ("conv2.weight", 1)),
        ChannelGroup((("conv2.weight", 0), *_bn("bn2"), ("conv3.weight", 1)), ("conv3.weight", 1)),
    ),
    "vit": (ChannelGroup((("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1)), ("mlp.fc2.weight", 1)),),
}


def _permute_(t: torch.Tensor, dim: int, order: torch.Tensor) -> None:
    t.copy_(t.index_select(dim, order.to(t.device)))


# ---------------------------------------------------------------------------------------------
# super-operators


class SuperOp(nn.Module):
    """All expansions of one family+kernel (or heads) for one block, sharing the widest weights.

    ``full`` is the standalone operator at the widest elastic expansion; narrower widths run the
    same module class through ``torch.func.functional_call`` on prefix views of its tensors, so
    gradients reach only the prefix and BatchNorm running stats update only the prefix.

    ``ir`` at expansion 1 has no expand conv and is not a slice: it lives in ``unsliced`` as its
    own module under the same super-operator, trained when ``sample_expansion`` draws it.
    """

    def __init__(self, family: str, kernel: int, heads: int, expansions: Sequence[float], in_shape, out_shape, act_layer=None):
        super().__init__()
        if family not in ELASTIC_FAMILIES:
            raise EtaError(f"operator family '{family}' has no super-operator (elastic families: {', '.join(ELASTIC_FAMILIES)})")
        if not expansions:
            raise EtaError(f"super-operator {family} needs at least one expansion")
        self.family, self.kernel, self.heads = family, int(kernel), int(heads)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.act_layer = act_layer
        self.expansions: tuple[float, ...] = tuple(sorted({float(e) for e in expansions}))
        specs = {e: self.spec(e) for e in self.expansions}
        in_ch, out_ch = (self.in_shape[1], self.in_shape[1]) if family == "vit" else (self.in_shape[0], self.out_shape[0])
        self.widths: dict[float, int] = {e: hidden_width(s, in_ch, out_ch) for e, s in specs.items()}
        sliced = [e for e in self.expansions if not _has_no_expand_conv(specs[e])]
        self.unsliced = nn.ModuleDict({
            _expansion_key(e): build_op(specs[e], in_shape, out_shape, act_layer) for e in self.expansions if e not in sliced
        })
        self.full = build_op(specs[sliced[-1]], in_shape, out_shape, act_layer) if sliced else None
        self.full_width = self.widths[sliced[-1]] if sliced else 0
        self._narrow: dict[int, nn.Module] = {}  # meta-device module per narrower width, run with sliced tensors
        for e in sliced:
            width = self.widths[e]
            assert width <= self.full_width, (e, width, self.full_width)
            if width < self.full_width and width not in self._narrow:
                with torch.device("meta"):
                    self._narrow[width] = build_op(specs[e], in_shape, out_shape, act_layer)
                self._check_slice_layout(width)

    @property
    def super_key(self) -> str:
        return self.spec(self.expansions[-1]).super_key

    def spec(self, expansion: float) -> OpSpec:
        return OpSpec(self.family, kernel=self.kernel, expansion=float(expansion), heads=self.heads)

    def _check_slice_layout(self, width: int) -> None:
        """Guard that CHANNEL_GROUPS names exactly the tensors whose size follows the hidden width."""
        narrow = dict(self._narrow[width].state_dict(keep_vars=True))
        sliced = self._sliced_tensors(width)
        if narrow.keys() != sliced.keys() or any(narrow[k].shape != sliced[k].shape for k in narrow):
            raise RuntimeError(f"hidden-channel layout of '{self.family}' does not match its module at width {width}")

    def _hidden_dims(self) -> dict[str, tuple[int, ...]]:
        dims: dict[str, tuple[int, ...]] = {}
        for group in CHANNEL_GROUPS[self.family]:
            for name, dim in group.members:
                dims[name] = dims.get(name, ()) + (dim,)
        return dims

    def _sliced_tensors(self, width: int) -> dict[str, torch.Tensor]:
        """Views of ``full``'s parameters and buffers cut to the first ``width`` hidden channels."""
        dims = self._hidden_dims()
        out = {}
        for name, t in self.full.state_dict(keep_vars=True).items():
            for dim in dims.get(name, ()):
                t = t.narrow(dim, 0, width)
            out[name] = t
        return out

    def _check_expansion(self, expansion: float) -> float:
        e = float(expansion)
        if e not in self.widths:
            raise EtaError(f"expansion {expansion:g} is not one of super-operator {self.super_key}'s {list(self.expansions)}")
        return e

    def forward(self, x, expansion: float | None = None):
        e = self.expansions[-1] if expansion is None else self._check_expansion(expansion)
        key = _expansion_key(e)
        if key in self.unsliced:
            return self.unsliced[key](x)
        width = self.widths[e]
        if width == self.full_width:
            return self.full(x)
        narrow = self._narrow[width].train(self.training)
        return functional_call(narrow, self._sliced_tensors(width), (x,))

    @torch.no_grad()
    def extract(self, expansion: float) -> nn.Module:
        """The operator at ``expansion`` as a standalone module (the class ``build_op`` returns), weights copied."""
        e = self._check_expansion(expansion)
        key = _expansion_key(e)
        if key in self.unsliced:
            return copy.deepcopy(self.unsliced[key])
        with torch.device("meta"):
            op = build_op(self.spec(e), self.in_shape, self.out_shape, self.act_layer)
        state = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in self._sliced_tensors(self.widths[e]).items()}
        op.load_state_dict(state, assign=True)
        return op.train(self.training)

    @torch.no_grad()
    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Reorder hidden channels by importance so every prefix keeps the most useful ones.

        Function-preserving at full width. Gradients and, when ``optimizer`` is given, its
        per-parameter state (e.g. Adam moments) are permuted along so they stay with their channel.
        """
        if self.full is None:
            return
        tensors = self.full.state_dict(keep_vars=True)
        for group in CHANNEL_GROUPS[self.family]:
            name, dim = group.reader
            importance = tensors[name].detach().abs().movedim(dim, 0).flatten(1).sum(1)
            order = torch.argsort(importance, descending=True, stable=True)
            for name, dim in group.members:
                t = tensors[name]
                _permute_(t.data, dim, order)
                if isinstance(t, nn.Parameter):
                    if t.grad is not None:
                        _permute_(t.grad, dim, order)
                    if optimizer is not None:
                        for v in optimizer.state.get(t, {}).values():
                            if torch.is_tensor(v) and v.shape == t.shape:
                                _permute_(v, dim, order)

    def sample_expansion(self, generator: torch.Generator) -> float:
        """A uniformly drawn expansion for one training step."""
        return self.expansions[int(torch.randint(len(self.expansions), (1,), generator=generator))]

    def extra_repr(self) -> str:
        return f"{self.super_key}, expansions={list(self.expansions)}, widths={[self.widths[e] for e in self.expansions]}"


def _expansion_key(expansion: float) -> str:
    return f"e{float(expansion):g}".replace(".", "_")


def build_super_ops(specs: Iterable[OpSpec], in_shape, out_shape, act_layer=None) -> nn.ModuleDict:
    """One :class:`SuperOp` per ``super_key`` among ``specs`` (identity and teacher have none), keys sorted."""
    groups: dict[str, list[OpSpec]] = {}
    for spec in specs:
        if spec.family not in ("identity", "teacher"):
            groups.setdefault(spec.super_key, []).append(spec)
    return nn.ModuleDict({
        key: SuperOp(group[0].family, group[0].kernel, group[0].heads, [s.expansion for s in group], in_shape, out_shape, act_layer)
        for key, group in sorted(groups.items())
    })
