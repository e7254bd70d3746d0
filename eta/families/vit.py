"""``vit``: timm's transformer ``Block`` on (tokens, width) features, its MLP width set exactly.

Expansion is the MLP ratio; heads are part of the super-operator's key (one super-operator per
head count). Transformer blocks have no integer lowering: they are offered at 32 bits only.
"""
from __future__ import annotations

from timm.layers import make_divisible
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import EtaError
from ..quant.lowering import register_no_lowering
from ..channels import ChannelGroup, Member
from .base import BlockSlot, Family
from .conv import CHANNEL_DIVISOR
from .registry import register

register_no_lowering(Block, "operator family vit has no integer lowering")


def token_width(spec, in_shape, out_shape) -> int:
    """Embedding size of a transformer block mapping (N,C) tokens to the same shape."""
    if len(in_shape) != 2 or tuple(in_shape) != tuple(out_shape):
        raise EtaError(f"operator '{spec}' maps (N, C) tokens to the same shape, got {tuple(in_shape)} -> {tuple(out_shape)}")
    dim = in_shape[1]
    if spec.heads < 1 or dim % spec.heads:
        raise EtaError(f"operator '{spec}': embedding size {dim} is not divisible by {spec.heads} heads")
    return dim


@register
class VitFamily(Family):
    name = "vit"
    fields = ("heads", "expansion")

    def fits(self, spec, slot: BlockSlot) -> bool:
        ins, outs = slot.in_shape, slot.out_shape
        return len(ins) == 2 and tuple(ins) == tuple(outs) and ins[1] % max(spec.heads, 1) == 0

    def hidden_width(self, spec, dim: int) -> int:
        if spec.expansion <= 0:
            raise EtaError(f"operator '{spec}' needs a positive expansion")
        return int(make_divisible(dim * spec.expansion, divisor=CHANNEL_DIVISOR))

    def hidden_widths(self, spec, slot: BlockSlot) -> dict[str, int]:
        return {"mlp": self.hidden_width(spec, token_width(spec, slot.in_shape, slot.out_shape))}

    def channel_groups(self, module: nn.Module, slot: BlockSlot):
        """The MLP's hidden width (heads are part of the super-operator's key, not sliced)."""
        reader = Member("mlp.fc2.weight", 1)
        return (ChannelGroup("mlp", (Member("mlp.fc1.weight", 0), Member("mlp.fc1.bias", 0), reader), reader, module.mlp.fc1.out_features),)

    def examples(self):
        return [([{"heads": 4, "expansion": e} for e in (1, 2, 4)], BlockSlot((5, 16), (5, 16)))]

    def build(self, spec, slot: BlockSlot) -> nn.Module:
        dim = token_width(spec, slot.in_shape, slot.out_shape)
        hidden = self.hidden_width(spec, dim)
        # timm sizes the MLP as int(dim * mlp_ratio); the half channel keeps float error from rounding down
        block = Block(dim, spec.heads, mlp_ratio=(hidden + 0.5) / dim, qkv_bias=True, act_layer=nn.GELU)
        assert block.mlp.fc1.out_features == hidden, (block.mlp.fc1.out_features, hidden)
        return block
