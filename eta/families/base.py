"""What an operator family is: one object that knows how its operators are named, where they fit,
how they are built, how their hidden channels are sliced and whether they have an integer lowering.

Everything else in eta asks the family instead of testing its name, so a new family is one
:class:`Family` subclass, registered (:func:`eta.families.register`), plus a pool entry in a space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..channels import ChannelGroup

if TYPE_CHECKING:  # OpSpec depends on the registry, not the other way round
    from ..arch import OpSpec


@dataclass(frozen=True)
class BlockSlot:
    """One replaceable block of a teacher as its candidates see it: shapes (batch-free) and the teacher's module."""

    in_shape: tuple
    out_shape: tuple
    teacher_block: nn.Module | None = None
    index: int = 0
    name: str = ""


class Family:
    """An operator family. Subclasses set the class attributes and implement :meth:`fits` and :meth:`build`.

    Class attributes:
      ``name``: the YAML name and the key of the registry; ``token``: its prefix in architecture
      strings (default ``name``); ``aliases``: other names accepted in YAML;
      ``fields``: the operator settings that vary within the family, in token order, among
      ``kernel``, ``heads``, ``expansion``; ``defaults``: values a field takes when not given
      (and which its token then omits);
      ``trainable``: phase 1 distils it (identity has nothing to learn);
      ``costs_latency``: it has a latency-table entry (identity costs nothing);
      ``integer``: offered at bit-widths below 32 (its modules have an integer lowering).
    """

    name: str = ""
    token: str = ""
    aliases: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    defaults: dict = {}
    trainable: bool = True
    costs_latency: bool = True
    integer: bool = False

    # --- naming -----------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self.token or self.name

    def super_key(self, spec: "OpSpec") -> str:
        """Which elastic super-operator ``spec`` is a slice of: the family and its fields but expansion, at its interface width."""
        parts = [self.name] + [f"{f[0]}{getattr(spec, f)}" for f in self.fields if f != "expansion"]
        if spec.width != 1:
            parts.append(f"x{spec.width:g}".replace(".", "p"))  # a module name: no dots
        return "_".join(parts)

    # --- placement and construction ---------------------------------------------------------------
    def fits(self, spec: "OpSpec", slot: BlockSlot) -> bool:
        """Whether ``spec`` can replace the block in ``slot`` (shapes, and at ``spec.bits``)."""
        raise NotImplementedError

    def build(self, spec: "OpSpec", slot: BlockSlot) -> nn.Module:
        """A standalone operator for ``slot`` with fresh weights (``spec.bits`` is ignored: float)."""
        raise NotImplementedError

    def skeleton(self, spec: "OpSpec", slot: BlockSlot) -> nn.Module:
        """The module tree of :meth:`build` on the meta device (no memory), to run with sliced tensors."""
        with torch.device("meta"):
            return self.build(spec, slot)

    def is_trainable(self, spec: "OpSpec") -> bool:
        return self.trainable

    # --- elastic width ----------------------------------------------------------------------------
    def channel_groups(self, module: nn.Module, slot: BlockSlot) -> tuple[ChannelGroup, ...]:
        """The hidden channel groups of one of this family's modules in ``slot`` (empty: nothing to slice)."""
        return ()

    def hidden_widths(self, spec: "OpSpec", slot: BlockSlot) -> dict[str, int] | None:
        """Width of each channel group (by name) at ``spec``; None when ``spec`` is not a slice of the
        widest operator (its own module, trained beside the super-operator)."""
        return None

    # --- for the tests parametrised over the registry ------------------------------------------------
    def examples(self) -> list[tuple[list[dict], BlockSlot]]:
        """Small (operator settings, slot) pairs the family fits, e.g. ``([{"kernel": 3, "expansion": 2}], slot)``:
        the tests parametrised over the registry run every family on them."""
        return []

    def __repr__(self) -> str:
        return f"<operator family {self.name}>"
