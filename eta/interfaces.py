"""Interface widths: how many of the teacher's channels a student keeps between its blocks.

Width scaling saves most where every block reads and writes: the channels *between* blocks. A
student at interface width ``w`` keeps the most important ``w`` of the teacher's channels at every
block boundary; its operators are built for those narrower shapes and distilled on the teacher's
features restricted to the kept channels.

Which boundaries share one set of channels (an identity shortcut carries a block's input to its
output) comes from Torch-Pruning's dependency graph of the whole cut teacher: a coupled group that
reaches more than one part (stem, a block, the head) is an *interface group*. Each group's boundaries
are found by permuting its channels and watching which features move, which also proves the group
is complete (the logits do not change). The teacher thinned to ``w`` is a copy with every interface
group ranked by importance and cut to its prefix; ``kept`` says where its channels sit among the
teacher's, so the teacher's features can be sliced to match.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from timm.layers import make_divisible
from torch import nn

from . import narrowing
from .channels import ChannelGroup, named_tensors, narrow_block, sort_channels
from .errors import EtaError
from .network import StemBlocksHead
from .teachers import features_at_blocks

CHANNEL_DIVISOR = narrowing.CHANNEL_DIVISOR


@dataclass(frozen=True)
class Interface:
    """One interface group and the boundaries it carries (boundary ``j``: block ``j``'s input; the last: the head's)."""

    group: ChannelGroup
    boundaries: tuple[int, ...]


@dataclass
class ThinnedTeacher:
    """The cut teacher at one interface width, and per boundary the teacher's channels it keeps, in its own order."""

    width: float
    split: StemBlocksHead
    kept: list[torch.Tensor] | None  # None at width 1: the teacher itself


def channels_at(full: int, width: float) -> int:
    """Channels kept of ``full`` at ``width``: a multiple of the divisor (at least one), never more than ``full``."""
    return full if width >= 1 else min(full, int(make_divisible(width * full, divisor=CHANNEL_DIVISOR)))


def _part(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"blocks.{rest.split('.')[0]}" if head == "blocks" else head


def _channel_dim(t: torch.Tensor) -> int:
    return 1 if t.dim() == 4 else t.dim() - 1  # (N, C, H, W) feature maps, (N, tokens, C) sequences


@torch.no_grad()
def _boundary_features(split: StemBlocksHead, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = len(split.blocks)
    feats = features_at_blocks(split, x, range(n))
    return [feats[j][0] for j in range(n)] + [feats[n - 1][1]], split.head(feats[n - 1][1])


def reader_importance(module: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Sum over every layer that reads the channels of its weights' L1 norm per channel, each layer scaled to mean 1:
    a channel many blocks lean on ranks high."""
    tensors = named_tensors(module)
    score = torch.zeros(group.full)
    readers = [m for m in group.members if m.dim == 1 and tensors[m.name].dim() >= 2] or [group.reader]
    for m in readers:
        t = tensors[m.name].detach().float().abs().movedim(m.dim, 0).reshape(group.full, -1).sum(1)
        score += t.cpu() / t.mean().clamp_min(1e-12).cpu()
    return score


def describe_interfaces(split: StemBlocksHead, input_shape: tuple) -> tuple[Interface, ...]:
    """The interface groups of a cut teacher, each with the boundaries it carries; one line naming the boundary otherwise."""
    label = f"the interfaces of {type(split).__name__}"
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    groups = []
    for root, *found in narrowing.traced_groups(split, example[:1], label):
        if len(found) == 1:
            continue  # not a prefix group: checked below through the boundaries it leaves uncovered
        members, reader, full, _ = found
        if len({_part(m.name) for m in members}) > 1:
            groups.append(ChannelGroup(f"interface:{root}", tuple(members), reader, int(full)))
    work = copy.deepcopy(split).eval()
    before, logits = _boundary_features(work, example)
    gen = torch.Generator().manual_seed(1)
    orders = sort_channels(work, groups, importance=lambda _m, g: torch.rand(g.full, generator=gen))
    after, logits_after = _boundary_features(work, example)
    if not torch.allclose(logits, logits_after, rtol=1e-4, atol=1e-5):
        raise EtaError(f"cannot narrow {label}: permuting the channels Torch-Pruning couples changes the teacher's output")
    owner: dict[int, int] = {}
    for j, (b, a) in enumerate(zip(before, after)):
        d = _channel_dim(b)
        for g in groups:
            moved = b.index_select(d, orders[g.name]) if b.shape[d] == g.full else None
            if moved is not None and torch.allclose(a, moved, rtol=1e-4, atol=1e-5) and not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                owner[j] = groups.index(g)
        if j not in owner:
            where = f"block {j}'s input" if j < len(split.blocks) else "the head's input"
            raise EtaError(f"cannot narrow {label}: no coupled channel group carries {where} "
                           f"({split.block_names[j] if j < len(split.blocks) else 'head'}); the teacher keeps its own interface width")
    return tuple(Interface(g, tuple(j for j in sorted(owner) if owner[j] == i)) for i, g in enumerate(groups)
                 if any(owner[j] == i for j in owner))


@torch.no_grad()
def thin(split: StemBlocksHead, interfaces: tuple[Interface, ...], width: float) -> ThinnedTeacher:
    """The teacher with each interface group ranked by importance and cut to ``channels_at(full, width)``."""
    if width >= 1:
        return ThinnedTeacher(1.0, split, None)
    work = copy.deepcopy(split)
    groups = [i.group for i in interfaces]
    orders = sort_channels(work, groups, importance=reader_importance)
    widths = {g.name: channels_at(g.full, width) for g in groups}
    thinned = narrow_block(work, groups, widths).eval()
    kept: list[torch.Tensor | None] = [None] * (len(split.blocks) + 1)
    for i in interfaces:
        for j in i.boundaries:
            kept[j] = orders[i.group.name][: widths[i.group.name]].clone()
    return ThinnedTeacher(float(width), thinned, kept)


def slice_channels(features: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The teacher's features at one boundary restricted to the channels a thinned student keeps."""
    if kept is None:
        return features
    return features.index_select(_channel_dim(features), kept.to(features.device))


__all__ = ["Interface", "ThinnedTeacher", "channels_at", "describe_interfaces", "reader_importance", "slice_channels", "thin"]
