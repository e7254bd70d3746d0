"""Elastic-width super-operators: every expansion of one operator shares the widest one's weights.

For each family and kernel (or head count) one *super-operator* is built at the largest width; a
narrower variant is the prefix of its hidden channels (the family's :class:`ChannelGroup` s say
which tensors those are), so training a random prefix each step trains every width at once, and
:meth:`SuperOp.extract` turns any prefix into a standalone module that computes exactly the same
function. Ranking channels by importance, so that prefixes keep the useful ones, is its own step
(:meth:`SuperOp.sort_channels`). Operators that are not slices (MobileNetV2's block without an
expand conv) live beside the slices under the same super-operator.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from . import channels, families
from .arch import OpSpec
from .channels import ChannelGroup, Importance, l1_importance
from .errors import EtaError
from .families import BlockSlot


class SuperOp(nn.Module):
    """All expansions of one family and kernel (or heads) for one block, sharing the widest weights.

    ``full`` is the standalone operator at the widest expansion; narrower widths run a meta-device
    copy of the same module tree through ``torch.func.functional_call`` on prefix views of its
    tensors (:func:`eta.channels.sliced_tensors`), so gradients reach only the prefix and BatchNorm
    running stats update only the prefix. ``widths[e]`` is each channel group's width at ``e``.
    """

    def __init__(self, specs: Iterable[OpSpec], slot: BlockSlot):
        super().__init__()
        specs = sorted({s.with_bits(32) for s in specs}, key=lambda s: s.expansion)
        if not specs:
            raise EtaError("a super-operator needs at least one operator")
        keys = {s.super_key for s in specs}
        if len(keys) != 1:
            raise EtaError(f"one super-operator holds one family and kernel, got {sorted(keys)}")
        self.family = specs[0].family
        fam = families.get(self.family)
        self.kernel, self.heads, self.width = specs[0].kernel, specs[0].heads, specs[0].width
        self.slot = slot
        self.expansions: tuple[float, ...] = tuple(s.expansion for s in specs)
        widths = {s.expansion: fam.hidden_widths(s, slot) for s in specs}
        sliced = [s for s in specs if widths[s.expansion] is not None]
        self.unsliced = nn.ModuleDict({_expansion_key(s.expansion): fam.build(s, slot) for s in specs if widths[s.expansion] is None})
        self.full = fam.build(sliced[-1], slot) if sliced else None
        self.groups: tuple[ChannelGroup, ...] = fam.channel_groups(self.full, slot) if sliced else ()
        self.widths: dict[float, dict[str, int]] = {s.expansion: channels.resolve_widths(self.groups, widths[s.expansion]) for s in sliced}
        self.full_widths = self.widths[sliced[-1].expansion] if sliced else {}
        self._narrow: dict[tuple, nn.Module] = {}  # plain dict: meta modules are neither state nor moved by .to()
        for s in sliced:
            key = _widths_key(self.widths[s.expansion])
            if self.widths[s.expansion] != self.full_widths and key not in self._narrow:
                self._narrow[key] = fam.skeleton(s, slot)
                channels.check_slice_layout(self._narrow[key], self._sliced(self.widths[s.expansion]), slot.name or None)

    @property
    def super_key(self) -> str:
        return self.spec(self.expansions[-1]).super_key

    def spec(self, expansion: float) -> OpSpec:
        return OpSpec(self.family, kernel=self.kernel, expansion=float(expansion), heads=self.heads, width=self.width)

    def _sliced(self, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        return channels.sliced_tensors(self.full, self.groups, widths)

    def _check_expansion(self, expansion: float) -> float:
        e = float(expansion)
        if e not in self.expansions:
            raise EtaError(f"expansion {expansion:g} is not one of super-operator {self.super_key}'s {list(self.expansions)}")
        return e

    def forward(self, x, expansion: float | None = None):
        e = self.expansions[-1] if expansion is None else self._check_expansion(expansion)
        key = _expansion_key(e)
        if key in self.unsliced:
            return self.unsliced[key](x)
        widths = self.widths[e]
        if widths == self.full_widths:
            return self.full(x)
        narrow = self._narrow[_widths_key(widths)].train(self.training)
        return functional_call(narrow, self._sliced(widths), (x,))

    @torch.no_grad()
    def extract(self, expansion: float) -> nn.Module:
        """The operator at ``expansion`` as a standalone module (the class the family builds), weights copied."""
        e = self._check_expansion(expansion)
        key = _expansion_key(e)
        if key in self.unsliced:
            return copy.deepcopy(self.unsliced[key])
        op = families.get(self.family).skeleton(self.spec(e), self.slot)
        state = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in self._sliced(self.widths[e]).items()}
        op.load_state_dict(state, assign=True)
        return op.train(self.training)

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None, importance: Importance = l1_importance) -> None:
        """Reorder hidden channels by importance so every prefix keeps the most useful ones
        (:func:`eta.channels.sort_channels`: function-preserving at full width; gradients and the
        optimizer's per-parameter state move along)."""
        if self.full is not None:
            channels.sort_channels(self.full, self.groups, optimizer, importance)

    def sample_expansion(self, generator: torch.Generator) -> float:
        """A uniformly drawn expansion for one training step."""
        return self.expansions[int(torch.randint(len(self.expansions), (1,), generator=generator))]

    def extra_repr(self) -> str:
        return f"{self.super_key}, expansions={list(self.expansions)}, widths={[self.widths.get(e) for e in self.expansions]}"


def _widths_key(widths: dict[str, int]) -> tuple:
    return tuple(sorted(widths.items()))


def _expansion_key(expansion: float) -> str:
    return f"e{float(expansion):g}".replace(".", "_")


def super_op_name(spec: OpSpec, elastic: bool) -> str:
    """Name of the super-operator that holds ``spec`` in a block's phase-1 weights (one per expansion when
    elasticity is off)."""
    return spec.super_key if elastic else f"{spec.super_key}_e{spec.expansion:g}".replace(".", "p")


def build_super_ops(specs: Iterable[OpSpec], slot: BlockSlot, elastic: bool = True) -> nn.ModuleDict:
    """The super-operators that hold ``specs`` (operators phase 1 trains), keyed by :func:`super_op_name`, sorted."""
    groups: dict[str, list[OpSpec]] = {}
    for spec in specs:
        groups.setdefault(super_op_name(spec, elastic), []).append(spec)
    return nn.ModuleDict({key: SuperOp(group, slot) for key, group in sorted(groups.items())})
