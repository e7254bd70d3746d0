"""Small teachers eta trains itself: the laptop demo (digits) and the CPU benchmark (Fashion-MNIST).

They are written as eta's :class:`~eta.network.StemBlocksHead`, so :func:`eta.teachers.split_teacher` cuts them
without configuration, and they are assembled from timm's own blocks (``InvertedResidual``,
``BasicBlock``) and layers, so they behave like the timm families eta is meant for.
"""
from __future__ import annotations

from timm.layers import ClassifierHead, ConvNormAct, make_divisible
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models.resnet import BasicBlock, downsample_conv
from torch import nn

from .network import StemBlocksHead


def _conv_head(in_chs: int, hidden: int, num_classes: int, drop_rate: float) -> nn.Module:
    """MobileNet-style head: 1x1 conv to ``hidden`` channels, global average pool, linear classifier."""
    return nn.Sequential(ConvNormAct(in_chs, hidden, 1),
                         ClassifierHead(hidden, num_classes, pool_type="avg", drop_rate=drop_rate))


def tiny_mbnet(num_classes: int = 10, in_chans: int = 1, *, width_mult: float = 1.0, head_width: int = 128,
               drop_rate: float = 0.0) -> nn.Module:
    """MobileNetV2-style teacher for 32x32 inputs (8x8 digits upscaled): stride-1 stem, six inverted
    residuals in three stages (16, 24, 40 channels at 32, 16, 8 pixels), conv head."""
    def w(c: int) -> int:
        return int(make_divisible(c * width_mult, divisor=8))

    # (out channels, depthwise kernel, expansion, stride) per block
    plan = [(w(16), 3, 3, 1),
            (w(24), 3, 4, 2), (w(24), 3, 4, 1),
            (w(40), 5, 4, 2), (w(40), 3, 4, 1), (w(40), 3, 4, 1)]
    stem_chs = w(16)
    blocks, chs = [], stem_chs
    for out, kernel, expansion, stride in plan:
        blocks.append(InvertedResidual(chs, out, dw_kernel_size=kernel, stride=stride, exp_ratio=expansion))
        chs = out
    return StemBlocksHead(ConvNormAct(in_chans, stem_chs, 3), blocks, _conv_head(chs, head_width, num_classes, drop_rate))


def _basic_block(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = downsample_conv(in_chs, out_chs, kernel_size=1, stride=stride, norm_layer=nn.BatchNorm2d)
    block = BasicBlock(in_chs, out_chs, stride=stride, downsample=downsample)
    block.zero_init_last()  # each residual starts as (almost) the identity, as timm's ResNets do
    return block


def small_resnet(num_classes: int = 10, in_chans: int = 1, *, width_mult: float = 1.0, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-style teacher for 28x28 inputs (Fashion-MNIST): stride-1 stem, seven basic blocks in three
    stages (16, 32, 64 channels at 28, 14, 7 pixels), pooled linear head."""
    def w(c: int) -> int:
        return int(make_divisible(c * width_mult, divisor=8))

    # (out channels, stride) per block
    plan = [(w(16), 1), (w(16), 1),
            (w(32), 2), (w(32), 1),
            (w(64), 2), (w(64), 1), (w(64), 1)]
    stem_chs = w(16)
    blocks, chs = [], stem_chs
    for out, stride in plan:
        blocks.append(_basic_block(chs, out, stride))
        chs = out
    head = ClassifierHead(chs, num_classes, pool_type="avg", drop_rate=drop_rate)
    return StemBlocksHead(ConvNormAct(in_chans, stem_chs, 3), blocks, head)
