"""``teacher``: the teacher's own block, kept as it is or narrowed by its own hidden width.

``teacher`` (expansion 1) is the block itself: it needs no training. ``teacher_e0.5`` is the same
block with half of its hidden channels (or heads), the most important ones by the teacher's own
weights, initialised from them and then distilled like every other candidate; its interface to
the neighbouring blocks stays the teacher's, or is the thinned teacher's at an interface width
below 1 (``teacher_x0.5``: the block of the teacher thinned by :mod:`eta.interfaces`, which no
longer computes what the teacher does and is distilled too). Every expansion of a block is one elastic
super-operator. Which channels are hidden is found by :mod:`eta.narrowing` (by hand for timm,
torchvision and eta blocks, by Torch-Pruning's dependency graph for any other conv block); a block
with none is offered at expansion 1 only. Below 32 bits the block (narrowed or not) is offered
where its structure has an integer lowering.
"""
from __future__ import annotations

import copy
import logging
import weakref

import torch
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from .. import channels, narrowing
from ..errors import EtaError
from ..quant.lowering import lowerable
from .base import BlockSlot, Family
from .registry import register

log = logging.getLogger(__name__)


@register
class TeacherFamily(Family):
    name = "teacher"
    fields = ("expansion",)
    defaults = {"expansion": 1.0}
    integer = True

    def __init__(self):
        self._groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # teacher block -> its channel groups

    def groups(self, slot: BlockSlot) -> tuple:
        """The hidden channel groups of the slot's teacher block (structure only, so cached per block); () if none."""
        block = slot.teacher_block
        if block not in self._groups:
            try:
                self._groups[block] = narrowing.describe_block(block, torch.zeros(1, *slot.in_shape), name=slot.name or None)
            except EtaError as err:
                log.info("teacher block %s is offered at its own width only: %s", slot.name or slot.index, err)
                self._groups[block] = ()
        return self._groups[block]

    def fits(self, spec, slot: BlockSlot) -> bool:
        if slot.teacher_block is None or not 0 < spec.expansion <= 1:
            return False
        if spec.expansion < 1 and not self.groups(slot):
            return False
        return spec.bits == 32 or lowerable(slot.teacher_block)

    def is_trainable(self, spec) -> bool:
        return spec.expansion < 1 or spec.width < 1  # the block itself is the teacher's, already trained

    def hidden_widths(self, spec, slot: BlockSlot) -> dict[str, int] | None:
        if spec.expansion == 1 and spec.width == 1:
            return None
        return narrowing.hidden_widths(self.groups(slot), spec.expansion)

    def channel_groups(self, module: nn.Module, slot: BlockSlot):
        return narrowing.describe_block(module, torch.zeros(1, *slot.in_shape), name=slot.name or None)

    def build(self, spec, slot: BlockSlot) -> nn.Module:
        """The block itself, or its most important hidden channels by the teacher's weights (ranked now)."""
        if slot.teacher_block is None:
            raise EtaError(f"block {slot.index}: the teacher operator needs the teacher's block")
        block = copy.deepcopy(slot.teacher_block)
        if spec.expansion == 1 and spec.width == 1:
            return block
        groups = self.groups(slot)
        channels.sort_channels(block, groups)
        return channels.narrow_block(block, groups, self.hidden_widths(spec, slot))

    def skeleton(self, spec, slot: BlockSlot) -> nn.Module:
        groups = self.groups(slot)
        widths = self.hidden_widths(spec, slot) or {g.name: g.full for g in groups}
        return channels.narrow_meta(slot.teacher_block, groups, widths)

    def examples(self):
        block = InvertedResidual(8, 8, exp_ratio=3).eval()
        return [([{"expansion": e} for e in (0.25, 0.5, 0.75)], BlockSlot((8, 8, 8), (8, 8, 8), block)),
                ([{}], BlockSlot((8, 8, 8), (8, 8, 8), block))]
