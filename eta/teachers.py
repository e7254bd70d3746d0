"""Teachers: build one by name and cut it into stem, replaceable blocks and head.

The cut must reproduce the teacher exactly (``head(blocks(stem(x))) == model(x)``); the pieces
share the teacher's modules, so loading teacher weights updates them. Supported automatically:
models with ``stem``/``blocks``/``head`` attributes (eta's convention), timm ResNets,
EfficientNets / MobileNets and Vision Transformers; any ``nn.Sequential`` with an explicit list of
block names. Anything else is refused with a message saying how to describe it.
"""
from __future__ import annotations

import importlib
import logging
import types
from typing import Callable

import torch
from torch import nn

from .errors import EtaError

log = logging.getLogger(__name__)


def build_teacher(model: str, *, num_classes: int, in_chans: int, kwargs: dict | None = None) -> nn.Module:
    """A timm model by name, or ``package.module:callable`` called with num_classes and in_chans."""
    kwargs = dict(kwargs or {})
    if ":" in model:
        mod_name, _, fn_name = model.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise EtaError(f"teacher.model '{model}': cannot import it ({err})") from None
        return fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    if not timm.is_model(model):
        raise EtaError(f"teacher.model '{model}' is neither a timm model name nor 'package.module:callable'")
    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


class _Part(nn.Module):
    """A piece of a model: some of its children and parameters, and a forward written against them.

    Plain attributes of the model (drop rates, prefix-token counts, pool types) are copied so the
    model's own methods (``forward_head``, ``_pos_embed``) run unchanged on the piece.
    """

    def __init__(self, model: nn.Module, children: list[str], params: list[str], fn: Callable):
        super().__init__()
        for name in children:
            child = getattr(model, name)
            if child is not None:
                self.add_module(name, child)
            else:
                setattr(self, name, None)
        for name in params:
            p = getattr(model, name, None)
            if p is None:
                setattr(self, name, None)
            else:
                self.register_parameter(name, p)
        for k, v in vars(model).items():
            if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor)) and not hasattr(self, k):
                setattr(self, k, v)
        self._fn = fn
        self._model_cls = type(model)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            method = getattr(self.__dict__.get("_model_cls"), name, None)  # the model's own helpers, e.g. ViT's pool()
            if callable(method):
                return types.MethodType(method, self)
            raise

    def forward(self, x):
        return self._fn(self, x)


class TeacherSplit(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, block_names: list[str]):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.block_names = list(block_names)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _stem_head_convention(model):
    if all(hasattr(model, a) for a in ("stem", "blocks", "head")) and isinstance(model.blocks, (nn.Sequential, nn.ModuleList)):
        return TeacherSplit(model.stem, list(model.blocks), model.head, [f"blocks.{i}" for i in range(len(model.blocks))])
    return None


def _timm_resnet(model):
    from timm.models.resnet import ResNet

    if not isinstance(model, ResNet):
        return None
    stem = _Part(model, ["conv1", "bn1", "act1", "maxpool"], [], lambda s, x: s.maxpool(s.act1(s.bn1(s.conv1(x)))))
    blocks, names = [], []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, layer)):
            blocks.append(blk)
            names.append(f"{layer}.{i}")
    head = _Part(model, ["global_pool", "fc"], [], type(model).forward_head)
    return TeacherSplit(stem, blocks, head, names)


def _timm_efficientnet(model):
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    if not isinstance(model, (EfficientNet, MobileNetV3)):
        return None
    stem = _Part(model, ["conv_stem", "bn1"], [], lambda s, x: s.bn1(s.conv_stem(x)))
    blocks, names = [], []
    for si, stage in enumerate(model.blocks):
        for bi, blk in enumerate(stage):
            blocks.append(blk)
            names.append(f"blocks.{si}.{bi}")
    head_children = [n for n, _ in model.named_children() if n not in ("conv_stem", "bn1", "blocks")]
    cls = type(model)
    if isinstance(model, EfficientNet):  # its conv_head / bn2 belong to forward_features
        head = _Part(model, head_children, [], lambda s, x: cls.forward_head(s, s.bn2(s.conv_head(x))))
    else:
        head = _Part(model, head_children, [], cls.forward_head)
    return TeacherSplit(stem, blocks, head, names)


def _timm_vit(model):
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    cls = type(model)
    stem_children = ["patch_embed", "pos_drop", "patch_drop", "norm_pre"]
    stem = _Part(model, stem_children, ["pos_embed", "cls_token", "reg_token"],
                 lambda s, x: s.norm_pre(s.patch_drop(cls._pos_embed(s, s.patch_embed(x)))))
    head_children = [n for n, _ in model.named_children() if n not in stem_children + ["blocks"]]
    head = _Part(model, head_children, [], lambda s, x: cls.forward_head(s, s.norm(x)))
    return TeacherSplit(stem, list(model.blocks), head, [f"blocks.{i}" for i in range(len(model.blocks))])


AUTO_SPLITTERS = (_stem_head_convention, _timm_resnet, _timm_efficientnet, _timm_vit)


def _explicit(model: nn.Module, names: list[str]) -> TeacherSplit:
    if not isinstance(model, nn.Sequential):
        raise EtaError(
            f"teacher {type(model).__name__}: explicit teacher.blocks needs an nn.Sequential model "
            "(or give the model stem/blocks/head attributes)"
        )
    children = list(model.named_children())
    order = [n for n, _ in children]
    missing = [n for n in names if n not in order]
    if missing:
        raise EtaError(f"teacher.blocks: {missing[0]} is not a child of {type(model).__name__} (children: {', '.join(order)})")
    idx = [order.index(n) for n in names]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise EtaError("teacher.blocks must be consecutive children, in order")
    stem = nn.Sequential(*[m for _, m in children[: idx[0]]])
    head = nn.Sequential(*[m for _, m in children[idx[-1] + 1 :]])
    return TeacherSplit(stem, [m for _, m in children[idx[0] : idx[-1] + 1]], head, names)


def split_teacher(model: nn.Module, blocks="auto") -> TeacherSplit:
    if blocks != "auto":
        return _explicit(model, list(blocks))
    for splitter in AUTO_SPLITTERS:
        split = splitter(model)
        if split is not None:
            return split
    raise EtaError(
        f"cannot split teacher {type(model).__name__} into blocks automatically: list them under teacher.blocks "
        "(children of an nn.Sequential), or give the model stem/blocks/head attributes"
    )


@torch.no_grad()
def block_io_shapes(split: TeacherSplit, input_shape: tuple) -> list[tuple[tuple, tuple]]:
    """(input, output) shape of every block, without the batch dimension."""
    was = split.training
    split.eval()
    x = split.stem(torch.zeros(1, *input_shape))
    shapes = []
    for b in split.blocks:
        y = b(x)
        shapes.append((tuple(x.shape[1:]), tuple(y.shape[1:])))
        x = y
    split.train(was)
    return shapes


def features_at_blocks(split: TeacherSplit, x: torch.Tensor, block_indices) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's input and output of each asked block, from one forward pass."""
    wanted = set(int(i) for i in block_indices)
    out = {}
    x = split.stem(x)
    for i, b in enumerate(split.blocks):
        if i > max(wanted):
            break
        y = b(x)
        if i in wanted:
            out[i] = (x, y)
        x = y
    return out
