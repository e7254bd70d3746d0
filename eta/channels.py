"""Hidden channels: which tensors of a module one set of channels indexes, and how to cut, copy and rank them.

A module's *interface* (its input and output channels) is fixed by its neighbours; the channels in
between are hidden and can shrink. A :class:`ChannelGroup` names the tensors (and the dimension of
each) one set of hidden channels indexes, so one prefix cut applied to all of them gives a smaller
module that still fits its neighbours, and one permutation applied to all of them leaves its
function unchanged. Groups of attention heads cut whole heads (Q, K and V rows and the projection's
columns of each head together), so head_dim, scale and any per-head q/k norm stay as they are.

Operator families and the teacher's own blocks describe their groups (:mod:`eta.families`,
:mod:`eta.narrowing`); everything that slices, copies or sorts by them is here: the elastic
super-operators (:mod:`eta.elastic`) and the narrowed teacher blocks use the same code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .errors import EtaError


class Member(NamedTuple):
    """One tensor dimension indexed by a group's units (channels or heads).

    The dimension holds ``chunks`` equal blocks (3 for a fused QKV projection), each made of the
    group's units in order, ``unit`` consecutive entries per unit (head_dim for heads).
    """

    name: str  # key in the block's state_dict
    dim: int
    chunks: int = 1
    unit: int = 1


@dataclass(frozen=True)


class ChannelGroup:
    """One set of hidden channels (or attention heads) of a block, cut and permuted together.

    ``reader`` is the member consuming the units (ranked by its L1 norm by default); ``full`` the
    teacher's width in units; ``owner`` the attention module whose ``num_heads`` follows the width.
    """

    name: str
    members: tuple[Member, ...]
    reader: Member
    full: int
    heads: bool = False
    owner: str | None = None


def describe_module(block: nn.Module, name: str | None) -> str:
    kind = type(block).__name__
    return f"block '{name}' ({kind})" if name else f"block {kind}"


def refuse(label: str, reason: str) -> EtaError:
    return EtaError(f"cannot narrow {label}: {reason}")


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state_dict key, plus non-persistent buffers (a meta copy then needs nothing of its own)."""
    out = {k: v for k, v in module.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
    for name, buf in module.named_buffers():
        out.setdefault(name, buf)
    return out


def validate_groups(block: nn.Module, groups: Sequence[ChannelGroup], label: str) -> None:
    tensors = named_tensors(block)
    names, cut = set(), set()
    for g in groups:
        if g.name in names:
            raise refuse(label, f"two hidden groups are called '{g.name}'")
        names.add(g.name)
        if g.full < 1 or g.reader not in g.members:
            raise refuse(label, f"hidden group '{g.name}' has width {g.full} or a reader outside its members")
        for m in g.members:
            t = tensors.get(m.name)
            if t is None:
                raise refuse(label, f"hidden group '{g.name}' names '{m.name}', which the block does not have")
            if t.dim() <= m.dim or t.shape[m.dim] != m.chunks * g.full * m.unit:
                raise refuse(label, f"'{m.name}' is not {m.chunks}x{g.full}x{m.unit} wide along dim {m.dim}")
            if m.chunks > 1 and not isinstance(t, nn.Parameter):
                raise refuse(label, f"buffer '{m.name}' would be cut in chunks, which cannot be a view")
            if (m.name, m.dim) in cut:
                raise refuse(label, f"'{m.name}' dim {m.dim} belongs to two hidden groups")
            cut.add((m.name, m.dim))


def resolve_widths(groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> dict[str, int]:
    """Every group's width (groups not named keep their full width), checked to lie in 1..full."""
    by_name = {g.name: g for g in groups}
    unknown = set(widths) - set(by_name)
    if unknown:
        raise EtaError(f"widths name unknown hidden groups {sorted(unknown)} (groups: {sorted(by_name)})")
    out = {}
    for g in groups:
        w = int(widths.get(g.name, g.full))
        if not 1 <= w <= g.full:
            raise EtaError(f"width {w} of hidden group '{g.name}' is outside 1..{g.full}")
        out[g.name] = w
    return out


# ---------------------------------------------------------------------------------------------
# prefixes


def _take_prefix(t: torch.Tensor, m: Member, full: int, width: int) -> torch.Tensor:
    """The first ``width`` units of ``t`` along ``m.dim`` (in every chunk): a view unless chunks > 1."""
    if width == full:
        return t
    if m.chunks == 1:
        return t.narrow(m.dim, 0, width * m.unit)
    shape = t.shape
    blocks = t.reshape(*shape[:m.dim], m.chunks, full * m.unit, *shape[m.dim + 1:])
    return blocks.narrow(m.dim + 1, 0, width * m.unit).flatten(m.dim, m.dim + 1)


def _cuts(groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> dict[str, list[tuple[Member, int, int]]]:
    cuts: dict[str, list[tuple[Member, int, int]]] = {}
    for g in groups:
        for m in g.members:
            cuts.setdefault(m.name, []).append((m, g.full, widths[g.name]))
    return cuts


def sliced_tensors(full_block: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``full_block``'s tensors keyed like its state_dict, each cut to the prefix widths (views: gradients reach only the prefix)."""
    widths = resolve_widths(groups, widths)
    cuts = _cuts(groups, widths)
    out = {}
    for name, t in named_tensors(full_block).items():
        for m, full, width in cuts.get(name, ()):
            t = _take_prefix(t, m, full, width)
        out[name] = t
    return out


def _copy_with(block: nn.Module, groups, widths: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``block`` holding ``tensors`` in place of its own, size attributes fixed to match."""
    memo = {}
    for name, old in named_tensors(block).items():
        if id(old) in memo:  # tied tensors stay tied
            continue
        new = tensors[name]
        memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    narrow = copy.deepcopy(block, memo)
    _fix_attributes(narrow, groups, widths)
    return narrow


def _fix_attributes(module: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> None:
    """Size attributes that forward (or a later exporter) reads, set from the tensors' new shapes."""
    for m in module.modules():
        if isinstance(m, _ConvNd):
            w = m.weight.shape
            if m.groups == m.in_channels == m.out_channels and m.groups > 1:  # depthwise: groups follow the channels
                m.in_channels = m.out_channels = m.groups = w[0]
            elif m.groups == 1:
                m.out_channels, m.in_channels = (w[1], w[0]) if m.transposed else (w[0], w[1])
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, _BatchNorm):
            ref = m.running_mean if m.running_mean is not None else m.weight
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()
        elif isinstance(m, nn.Sequential) and isinstance(getattr(m, "out_channels", None), int) and len(m) \
                and isinstance(m[0], _ConvNd):  # torchvision's ConvNormActivation records its width
            m.out_channels = m[0].out_channels
    for g in groups:
        if g.owner is not None:
            attn = module.get_submodule(g.owner)
            attn.num_heads = widths[g.name]
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = widths[g.name] * attn.head_dim  # head_dim and scale do not change


def narrow_meta(block: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> nn.Module:
    """The narrow block on the meta device (no weights): run it with ``functional_call`` on :func:`sliced_tensors`."""
    widths = resolve_widths(groups, widths)
    cuts = _cuts(groups, widths)
    meta = {}
    for name, t in named_tensors(block).items():
        t = torch.empty_like(t, device="meta")
        for m, full, width in cuts.get(name, ()):
            t = _take_prefix(t, m, full, width)
        meta[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return _copy_with(block, groups, widths, meta)


@torch.no_grad()


def narrow_block(block: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> nn.Module:
    """A standalone copy of ``block`` keeping the first ``widths[g]`` units of each hidden group, weights copied:
    the same classes, with their size attributes fixed, so its forward (and integer lowering) still apply."""
    widths = resolve_widths(groups, widths)
    state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sliced_tensors(block, groups, widths).items()}
    return _copy_with(block, groups, widths, state).train(block.training)


def check_slice_layout(narrow: nn.Module, sliced: Mapping[str, torch.Tensor], name: str | None = None) -> None:
    """Guard that a narrow module's tensors match the slices by key and shape, and its size attributes its tensors."""
    label = describe_module(narrow, name)
    own = named_tensors(narrow)
    if own.keys() != sliced.keys():
        raise refuse(label, f"its tensors {sorted(own.keys() ^ sliced.keys())[:3]} differ from the slice's")
    for k, t in own.items():
        if t.shape != sliced[k].shape:
            raise refuse(label, f"'{k}' is {tuple(t.shape)} in the narrow module but {tuple(sliced[k].shape)} in the slice")
    for path, m in narrow.named_modules():
        expect = None
        if isinstance(m, _ConvNd) and not m.transposed:
            expect = (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            expect = (m.out_features, m.in_features)
        if expect is not None and tuple(m.weight.shape[:2]) != expect:
            raise refuse(label, f"'{path}' says {expect} channels but holds weights of shape {tuple(m.weight.shape)}")


Importance = Callable[[nn.Module, ChannelGroup], torch.Tensor]


def _per_unit(t: torch.Tensor, m: Member, full: int) -> torch.Tensor:
    """Sum of ``t`` over everything but the group's units: one score per channel (or head)."""
    return t.movedim(m.dim, 0).reshape(m.chunks, full, m.unit, -1).sum(dim=(0, 2, 3))


def l1_importance(block: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of the weights that read each unit: how much the block's output depends on it."""
    t = named_tensors(block)[group.reader.name].detach()
    return _per_unit(t.abs(), group.reader, group.full)


def taylor_importance(block: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """First-order Taylor |w * dL/dw| over the group's parameters: the loss change if a unit were removed. Needs gradients."""
    score, seen = torch.zeros(group.full), False
    tensors = named_tensors(block)
    for m in group.members:
        t = tensors[m.name]
        if isinstance(t, nn.Parameter) and t.grad is not None:
            score = score.to(t.device) + _per_unit((t.detach() * t.grad).abs(), m, group.full)
            seen = True
    if not seen:
        raise EtaError(f"Taylor importance of hidden group '{group.name}' needs gradients: run backward first")
    return score


def _permute_(t: torch.Tensor, m: Member, full: int, order: torch.Tensor) -> None:
    moved = t.movedim(m.dim, 0)
    units = moved.reshape(m.chunks, full, m.unit, *moved.shape[1:]).index_select(1, order.to(t.device))
    t.copy_(units.reshape(moved.shape).movedim(0, m.dim))


@torch.no_grad()


def sort_channels(block: nn.Module, groups: Sequence[ChannelGroup], optimizer: torch.optim.Optimizer | None = None,
                         importance: Importance = l1_importance) -> dict[str, torch.Tensor]:
    """Permute each group's units by descending importance, so every prefix keeps the most important ones.

    Function-preserving at full width. Gradients and ``optimizer``'s per-parameter state (Adam
    moments) move with their channel. Returns each group's order (new position -> old unit).
    """
    tensors = named_tensors(block)
    orders = {}
    for g in groups:
        scores = importance(block, g)
        if scores.shape != (g.full,):
            raise EtaError(f"importance of hidden group '{g.name}' has shape {tuple(scores.shape)}, not ({g.full},)")
        order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
        for m in g.members:
            t = tensors[m.name]
            _permute_(t.data, m, g.full, order)
            if isinstance(t, nn.Parameter):
                if t.grad is not None:
                    _permute_(t.grad, m, g.full, order)
                state = optimizer.state.get(t, {}) if optimizer is not None else {}
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == t.shape:
                        _permute_(v, m, g.full, order)
        orders[g.name] = order
    return orders
