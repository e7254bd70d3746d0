"""``teacher``: the teacher's own block, kept. It needs no training; at bit-widths below 32 it is
offered only where its structure has an integer lowering."""
from __future__ import annotations

import copy

from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from ..errors import EtaError
from ..quant.lowering import lowerable
from .base import BlockSlot, Family
from .registry import register


@register
class TeacherFamily(Family):
    name = "teacher"
    fields = ("expansion",)
    defaults = {"expansion": 1.0}
    trainable = False
    integer = True

    def fits(self, spec, slot: BlockSlot) -> bool:
        if spec.expansion != 1.0:
            return False
        return spec.bits == 32 or (slot.teacher_block is not None and lowerable(slot.teacher_block))

    def examples(self):
        block = InvertedResidual(8, 8, exp_ratio=3).eval()
        return [([{}], BlockSlot((8, 8, 8), (8, 8, 8), block))]

    def build(self, spec, slot: BlockSlot) -> nn.Module:
        if slot.teacher_block is None:
            raise EtaError(f"block {slot.index}: the teacher operator needs the teacher's block")
        return copy.deepcopy(slot.teacher_block)
