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
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from . import families
from .arch import OpSpec
from .errors import EtaError
from .families import BlockSlot, ChannelGroup

Importance = Callable[[torch.Tensor, int], torch.Tensor]


def l1_importance(reader: torch.Tensor, dim: int) -> torch.Tensor:
    """Channels ranked by the L1 norm of the weights that consume them."""
    return reader.detach().abs().movedim(dim, 0).flatten(1).sum(1)


class SuperOp(nn.Module):
    """All expansions of one family and kernel (or heads) for one block, sharing the widest weights.

    ``full`` is the standalone operator at the widest expansion; narrower widths run a meta-device
    copy of the same module tree through ``torch.func.functional_call`` on prefix views of its
    tensors, so gradients reach only the prefix and BatchNorm running stats update only the prefix.
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
        self.kernel, self.heads = specs[0].kernel, specs[0].heads
        self.slot = slot
        self.expansions: tuple[float, ...] = tuple(s.expansion for s in specs)
        widths = {s.expansion: fam.hidden_widths(s, slot) for s in specs}
        sliced = [s for s in specs if widths[s.expansion] is not None]
        self.unsliced = nn.ModuleDict({_expansion_key(s.expansion): fam.build(s, slot) for s in specs if widths[s.expansion] is None})
        self.full = fam.build(sliced[-1], slot) if sliced else None
        self.groups: tuple[ChannelGroup, ...] = fam.channel_groups(self.full) if sliced else ()
        self.widths: dict[float, tuple[int, ...]] = {s.expansion: tuple(widths[s.expansion]) for s in sliced}
        self.full_widths = self.widths[sliced[-1].expansion] if sliced else ()
        self._narrow: dict[tuple[int, ...], nn.Module] = {}
        for s in sliced:
            w = self.widths[s.expansion]
            if len(w) != len(self.groups):
                raise RuntimeError(f"family '{self.family}' gives {len(w)} widths for {len(self.groups)} channel groups")
            if w != self.full_widths and w not in self._narrow:
                self._narrow[w] = fam.skeleton(s, slot)
                self._check_slice_layout(w)

    @property
    def super_key(self) -> str:
        return self.spec(self.expansions[-1]).super_key

    def spec(self, expansion: float) -> OpSpec:
        return OpSpec(self.family, kernel=self.kernel, expansion=float(expansion), heads=self.heads)

    def _check_slice_layout(self, widths: tuple[int, ...]) -> None:
        """Guard that the family's channel groups name exactly the tensors whose size follows the hidden width."""
        narrow = dict(self._narrow[widths].state_dict(keep_vars=True))
        sliced = self._sliced_tensors(widths)
        if narrow.keys() != sliced.keys() or any(narrow[k].shape != sliced[k].shape for k in narrow):
            raise RuntimeError(f"hidden-channel layout of '{self.family}' does not match its module at widths {widths}")

    def _sliced_tensors(self, widths: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Views of ``full``'s parameters and buffers cut to the first ``widths`` channels of each group."""
        cut: dict[str, list[tuple[int, int]]] = {}
        for group, width in zip(self.groups, widths):
            for name, dim in group.members:
                cut.setdefault(name, []).append((dim, width))
        out = {}
        for name, t in self.full.state_dict(keep_vars=True).items():
            for dim, width in cut.get(name, ()):
                t = t.narrow(dim, 0, width)
            out[name] = t
        return out

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
        narrow = self._narrow[widths].train(self.training)
        return functional_call(narrow, self._sliced_tensors(widths), (x,))

    @torch.no_grad()
    def extract(self, expansion: float) -> nn.Module:
        """The operator at ``expansion`` as a standalone module (the class the family builds), weights copied."""
        e = self._check_expansion(expansion)
        key = _expansion_key(e)
        if key in self.unsliced:
            return copy.deepcopy(self.unsliced[key])
        op = families.get(self.family).skeleton(self.spec(e), self.slot)
        state = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in self._sliced_tensors(self.widths[e]).items()}
        op.load_state_dict(state, assign=True)
        return op.train(self.training)

    @torch.no_grad()
    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None, importance: Importance = l1_importance) -> None:
        """Reorder hidden channels by importance so every prefix keeps the most useful ones.

        Function-preserving at full width. Gradients and, when ``optimizer`` is given, its
        per-parameter state (e.g. Adam moments) are permuted along so they stay with their channel.
        """
        if self.full is None:
            return
        tensors = self.full.state_dict(keep_vars=True)
        for group in self.groups:
            name, dim = group.reader
            scores = importance(tensors[name], dim)
            if group.unit > 1:  # whole units (heads) move together, ranked by their summed importance
                units = torch.argsort(scores.view(-1, group.unit).sum(1), descending=True, stable=True)
                order = (units[:, None] * group.unit + torch.arange(group.unit, device=units.device)).flatten()
            else:
                order = torch.argsort(scores, descending=True, stable=True)
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
        return f"{self.super_key}, expansions={list(self.expansions)}, widths={[self.widths.get(e) for e in self.expansions]}"


def _permute_(t: torch.Tensor, dim: int, order: torch.Tensor) -> None:
    t.copy_(t.index_select(dim, order.to(t.device)))


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
