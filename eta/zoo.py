"""Small teachers eta trains itself, for the laptop demo and the CPU test spaces.

They follow eta's stem / blocks / head convention and are built from the same operator classes
as the candidates, so a teacher block and a candidate of the same family are the same module type.
"""
from __future__ import annotations

from timm.layers import ConvNormAct, SelectAdaptivePool2d
from torch import nn

from .arch import OpSpec
from .ops import build_op


class StemBlocksHead(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _head(in_ch: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(ConvNormAct(in_ch, hidden, 1), SelectAdaptivePool2d(pool_type="avg", flatten=True), nn.Linear(hidden, num_classes))


def _stage_blocks(plan, c0: int, res: int):
    """plan: (family, kernel, expansion, out_channels, stride) per block; shapes chained from (c0, res)."""
    blocks, c, r = [], c0, res
    for fam, k, e, out, s in plan:
        blocks.append(build_op(OpSpec(fam, k, e), (c, r, r), (out, r // s, r // s)))
        c, r = out, r // s
    return blocks, c


def tiny_mbnet(num_classes: int = 10, in_chans: int = 1, width: int = 16, **_) -> nn.Module:
    """MobileNet-style teacher for 32x32 inputs: stem, six inverted residuals in three stages, conv head."""
    w = width
    plan = [("ir", 3, 3, w, 1), ("ir", 3, 4, w * 3 // 2, 2), ("ir", 3, 4, w * 3 // 2, 1),
            ("ir", 5, 4, w * 5 // 2, 2), ("ir", 3, 4, w * 5 // 2, 1), ("ir", 3, 4, w * 5 // 2, 1)]
    blocks, c = _stage_blocks(plan, w, 32)
    return StemBlocksHead(ConvNormAct(in_chans, w, 3), blocks, _head(c, 128, num_classes))


def small_resnet(num_classes: int = 10, in_chans: int = 1, width: int = 32, **_) -> nn.Module:
    """ResNet-style teacher for 28x28 inputs: stem, seven basic blocks in three stages, conv head."""
    w = width
    plan = [("basic", 3, 1, w, 1), ("basic", 3, 1, w, 1), ("basic", 3, 1, 2 * w, 2), ("basic", 3, 1, 2 * w, 1),
            ("basic", 3, 1, 2 * w, 1), ("basic", 3, 1, 4 * w, 2), ("basic", 3, 1, 4 * w, 1)]
    blocks, c = _stage_blocks(plan, w, 28)
    return StemBlocksHead(ConvNormAct(in_chans, w, 3), blocks, _head(c, 256, num_classes))
