"""``identity`` (token ``id``): skip the block. Costs no latency and needs no training."""
from __future__ import annotations

from torch import nn

from ..errors import EtaError
from ..quant.lowering import register_no_lowering
from .base import BlockSlot, Family
from .registry import register

register_no_lowering(nn.Identity, "operator family identity has no weights to quantize; it runs unchanged at every bit-width")


@register
class IdentityFamily(Family):
    name = "identity"
    token = "id"
    trainable = False
    costs_latency = False

    def fits(self, spec, slot: BlockSlot) -> bool:
        return tuple(slot.in_shape) == tuple(slot.out_shape)

    def examples(self):
        return [([{}], BlockSlot((8, 4, 4), (8, 4, 4))), ([{}], BlockSlot((5, 16), (5, 16)))]

    def build(self, spec, slot: BlockSlot) -> nn.Module:
        if not self.fits(spec, slot):
            raise EtaError(f"identity cannot replace a block that maps {tuple(slot.in_shape)} to {tuple(slot.out_shape)}")
        return nn.Identity()
