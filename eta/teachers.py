"""Teachers: build one by name, and cut it into a stem, replaceable blocks and a head.

The cut must compute exactly what the teacher computes (``head(blocks(stem(x))) == model(x)``) and
share the teacher's modules, so loading teacher weights into the model updates every piece. Where a
family's own code runs the head (timm's ``forward_head``), the piece runs that same code, so model
options such as pooling type or prefix tokens keep working without eta restating them.

Cut automatically: eta's convention (``stem``/``blocks``/``head`` attributes), timm ResNets,
EfficientNets / MobileNetV2s, MobileNetV3s and Vision Transformers by their own code; any other
model from its torch.fx graph (:mod:`eta.graph_cut`), which finds the residual blocks of e.g.
torchvision's ResNets, MobileNets, EfficientNets, RegNets and ConvNeXts. An explicit list of dotted
block paths may regroup the automatic blocks of a known family, or name any chain of module calls.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import logging
import types
from typing import Callable, Iterable

import torch
from torch import nn

from . import graph_cut
from .errors import EtaError, first_line
from .network import StemBlocksHead

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# building


def build_teacher(model: str, *, num_classes: int, in_chans: int, kwargs: dict | None = None) -> nn.Module:
    """A timm model by name (untrained), or ``package.module:callable`` called with num_classes (and in_chans
    where its signature names it; otherwise its first convolution is adapted to ``in_chans``)."""
    kwargs = dict(kwargs or {})
    if ":" in model:
        return _build_callable(model, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs)
    import timm

    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EtaError(f"teacher.model '{model}' is neither a timm model name nor 'package.module:callable'{hint}")
    try:
        return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:
        raise EtaError(f"teacher.model '{model}': bad teacher.kwargs ({str(err).splitlines()[0]})") from None


def _names_parameter(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _build_callable(model: str, *, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    module_name, _, fn_name = model.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise EtaError(f"teacher.model '{model}': cannot import it ({err})") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise EtaError(f"teacher.model '{model}': importing {module_name} failed ({type(err).__name__}: "
                       f"{first_line(err)})") from None
    if not callable(fn):
        raise EtaError(f"teacher.model '{model}' is a {type(fn).__name__}, not a callable")
    # torchvision's builders take num_classes only (in_chans would reach the model class and fail)
    takes_in_chans = _names_parameter(fn, "in_chans") or "in_chans" in kwargs
    args = {"num_classes": num_classes, **({"in_chans": in_chans} if takes_in_chans else {}), **kwargs}
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as err:
        raise EtaError(f"teacher.model '{model}' must accept num_classes= (in_chans= where it can) and teacher.kwargs "
                       f"({err})") from None
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    try:
        built = fn(**args)
    except Exception as err:  # noqa: BLE001 - whatever the user's code raises becomes one line
        given = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise EtaError(f"teacher.model '{model}' failed when called with {given}: {type(err).__name__}: "
                       f"{first_line(err)}") from None
    if not isinstance(built, nn.Module):
        raise EtaError(f"teacher.model '{model}' returned a {type(built).__name__}, not a torch nn.Module")
    if not takes_in_chans:
        adapt_input_channels(built, in_chans, model)
    return built


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


@torch.no_grad()
def adapt_input_channels(model: nn.Module, in_chans: int, name: str) -> None:
    """Give a model built for another channel count a first convolution taking ``in_chans`` channels.

    Its weights are the old ones summed over input channels (one channel) or repeated and rescaled,
    so a pretrained filter keeps its response to a grey or multi-band image of the same brightness.
    """
    found = _first_conv(model)
    if found is None:
        raise EtaError(f"teacher.model '{name}' does not take in_chans= and has no nn.Conv2d to adapt to the data's "
                       f"{in_chans} channels; make it accept in_chans=")
    path, conv = found
    if conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise EtaError(f"teacher.model '{name}': its first conv '{path}' is grouped ({conv.groups} groups) and takes "
                       f"{conv.in_channels} channels, the data has {in_chans}; make the model accept in_chans=")
    weight = conv.weight
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // conv.in_channels)
        adapted = weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (conv.in_channels / in_chans)
    new = copy.deepcopy(conv)
    new.in_channels = in_chans
    new.weight = nn.Parameter(adapted.contiguous(), requires_grad=weight.requires_grad)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    log.info("teacher.model %s: first conv '%s' took %d channels, the data has %d; replaced by a %d-channel conv",
             name, path, conv.in_channels, in_chans, in_chans)


def pretrained_state(model: str, bound) -> dict:
    """timm's pretrained weights for the bound teacher (same classes, channels and kwargs), downloaded by timm once.

    Loaded on the driver only: every Ray task receives the weights, so no worker downloads them.
    """
    if ":" in model:
        raise EtaError(f"teacher.pretrained applies to timm models; load weights for '{model}' with teacher.checkpoint")
    import timm

    space = bound.space
    try:
        net = timm.create_model(model, pretrained=True, num_classes=bound.num_classes, in_chans=bound.in_chans, **space.teacher.kwargs)
    except Exception as err:  # noqa: BLE001 - hub, network and file errors have many types
        raise EtaError(f"teacher '{model}': cannot get timm's pretrained weights ({str(err).splitlines()[0][:200]})") from None
    return net.state_dict()


# ---------------------------------------------------------------------------------------------
# pieces of a model


class ModelPart(nn.Module):
    """Some children and direct tensors of a model, run by a function written against the model.

    The model's plain settings (drop rates, pooling type, prefix-token counts) are copied and its
    methods are reachable from the part, so ``forward`` may call the model class's own code with
    the part as ``self`` (e.g. ``VisionTransformer.forward_head``). Only the listed children and
    tensors belong to the part: a deep copy of a head does not copy the whole teacher.
    """

    def __init__(self, model: nn.Module, children: Iterable[str], tensors: Iterable[str], run: Callable):
        super().__init__()
        for name in children:
            child = getattr(model, name, None)
            if isinstance(child, nn.Module):
                self.add_module(name, child)
            else:
                setattr(self, name, child)
        for name in tensors:  # parameters stay parameters, buffers stay buffers (both follow .to(device))
            tensor = getattr(model, name, None)
            if isinstance(tensor, nn.Parameter) or tensor is None:
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor, persistent=name not in model._non_persistent_buffers_set)
        for key, value in vars(model).items():
            if key.startswith("_") or key == "training" or hasattr(self, key):
                continue
            if not isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, key, value)
        self._run = run
        self._model_class = type(model)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("_model_class")
            attr = inspect.getattr_static(cls, name, None) if cls is not None else None
            if isinstance(attr, property):
                return attr.fget(self)
            if inspect.isfunction(attr):
                return types.MethodType(attr, self)
            raise

    def extra_repr(self) -> str:
        return f"of {self._model_class.__name__}, runs {getattr(self._run, '__name__', 'a function')}"

    def forward(self, x):
        return self._run(self, x)


# ---------------------------------------------------------------------------------------------
# automatic cuts, one per family; each returns None for a model it does not know


def _split_convention(model: nn.Module) -> StemBlocksHead | None:
    parts = [getattr(model, a, None) for a in ("stem", "blocks", "head")]
    if not all(isinstance(p, nn.Module) for p in parts) or not isinstance(parts[1], (nn.Sequential, nn.ModuleList)):
        return None
    names = [f"blocks.{n}" for n, _ in model.blocks.named_children()]
    return StemBlocksHead(model.stem, list(model.blocks), model.head, names)


def _resnet_stem(part, x):
    return part.maxpool(part.act1(part.bn1(part.conv1(x))))


def _split_timm_resnet(model: nn.Module) -> StemBlocksHead | None:
    from timm.models.resnet import ResNet

    if not isinstance(model, ResNet):
        return None
    stem = ModelPart(model, ["conv1", "bn1", "act1", "maxpool"], [], _resnet_stem)
    head = ModelPart(model, ["global_pool", "fc"], [], ResNet.forward_head)
    blocks, names = [], []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for n, block in getattr(model, layer).named_children():
            blocks.append(block)
            names.append(f"{layer}.{n}")
    return StemBlocksHead(stem, blocks, head, names)


def _efficientnet_stem(part, x):
    return part.bn1(part.conv_stem(x))


def _efficientnet_head(part, x):
    # EfficientNet's conv_head/bn2 belong to forward_features, not forward_head
    return part._model_class.forward_head(part, part.bn2(part.conv_head(x)))


def _split_timm_efficientnet(model: nn.Module) -> StemBlocksHead | None:
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    if not isinstance(model, (EfficientNet, MobileNetV3)):
        return None
    stem = ModelPart(model, ["conv_stem", "bn1"], [], _efficientnet_stem)
    head_children = [n for n, _ in model.named_children() if n not in ("conv_stem", "bn1", "blocks")]
    # MobileNetV3's forward_head already runs conv_head / norm_head / act2 (after pooling)
    run_head = type(model).forward_head if isinstance(model, MobileNetV3) else _efficientnet_head
    head = ModelPart(model, head_children, [], run_head)
    blocks, names = [], []
    for s, stage in model.blocks.named_children():
        for b, block in stage.named_children():
            blocks.append(block)
            names.append(f"blocks.{s}.{b}")
    return StemBlocksHead(stem, blocks, head, names)


VIT_STEM_CHILDREN = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


def _vit_stem(part, x):
    return part.norm_pre(part.patch_drop(part._model_class._pos_embed(part, part.patch_embed(x))))


def _vit_head(part, x):
    return part._model_class.forward_head(part, part.norm(x))


def _split_timm_vit(model: nn.Module) -> StemBlocksHead | None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    own = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    stem = ModelPart(model, VIT_STEM_CHILDREN, dict.fromkeys(own + ["cls_token", "reg_token", "pos_embed"]), _vit_stem)
    head_children = [n for n, _ in model.named_children() if n not in VIT_STEM_CHILDREN + ("blocks",)]
    head = ModelPart(model, head_children, [], _vit_head)
    names = [f"blocks.{n}" for n, _ in model.blocks.named_children()]
    return StemBlocksHead(stem, list(model.blocks), head, names)


AUTO_SPLITTERS = (_split_convention, _split_timm_resnet, _split_timm_efficientnet, _split_timm_vit)


def _auto_split(model: nn.Module) -> StemBlocksHead | None:
    for splitter in AUTO_SPLITTERS:
        split = splitter(model)
        if split is not None:
            return split
    return None


# ---------------------------------------------------------------------------------------------
# explicit block lists


def _regroup(model: nn.Module, auto: StemBlocksHead, names: list[str]) -> StemBlocksHead:
    """Blocks named by the user as whole automatic blocks, or containers holding a run of them."""
    spans = []
    for name in names:
        covered = [i for i, n in enumerate(auto.block_names) if n == name or n.startswith(name + ".")]
        inside = [n for n in auto.block_names if name.startswith(n + ".")]
        if inside:
            raise EtaError(f"teacher.blocks: '{name}' is inside block '{inside[0]}' of {type(model).__name__}; "
                           "list whole blocks or containers of them")
        if not covered:
            raise EtaError(f"teacher.blocks: '{name}' is not a block of {type(model).__name__} nor holds any "
                           f"(its blocks: {', '.join(auto.block_names[:4])}, ...)")
        spans.append((covered[0], covered[-1], name))
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start != end + 1:
            raise EtaError(f"teacher.blocks: '{b}' must directly follow '{a}' (blocks must be consecutive, in order)")
    blocks = []
    for start, end, name in spans:
        if end == start and auto.block_names[start] == name:
            blocks.append(auto.blocks[start])
            continue
        container = model.get_submodule(name)
        inner = [f"{name}.{n}" for n, _ in container.named_children()]
        if not _runs_children_in_order(container) or inner != auto.block_names[start: end + 1]:
            raise EtaError(f"teacher.blocks: '{name}' is not a sequence of whole blocks of {type(model).__name__}")
        blocks.append(container)
    first, last = spans[0][0], spans[-1][1]
    stem = auto.stem if first == 0 else nn.Sequential(auto.stem, *auto.blocks[:first])
    head = auto.head if last == len(auto.blocks) - 1 else nn.Sequential(*auto.blocks[last + 1:], auto.head)
    return StemBlocksHead(stem, blocks, head, names)


def _runs_children_in_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _split_sequential_chain(model: nn.Module, names: list[str]) -> StemBlocksHead:
    """Blocks that are consecutive children of a ``nn.Sequential`` reached through ``nn.Sequential``s from
    the model: what runs before them is the stem, what runs after is the head."""
    parents = {name.rpartition(".")[0] for name in names}
    if len(parents) != 1:
        raise EtaError(f"teacher.blocks of {type(model).__name__} must be children of one container; got {', '.join(names)}")
    parent_path = parents.pop()
    before, after = [], []
    container = model
    steps = parent_path.split(".") if parent_path else []
    for step in steps + [None]:
        if not _runs_children_in_order(container):
            raise EtaError(f"cannot cut teacher {type(model).__name__} at {', '.join(names)}: it does not run those "
                           "blocks as a chain of nn.Sequential containers; give it stem/blocks/head attributes")
        children = list(container.named_children())
        order = [n for n, _ in children]
        if step is None:
            break
        if step not in order:
            raise EtaError(f"teacher.blocks: {type(container).__name__} has no child '{step}' (children: {', '.join(order)})")
        at = order.index(step)
        before += [m for _, m in children[:at]]
        after = [m for _, m in children[at + 1:]] + after
        container = children[at][1]
    leaves = [name.rpartition(".")[2] for name in names]
    missing = [f"{parent_path + '.' if parent_path else ''}{leaf}" for leaf in leaves if leaf not in order]
    if missing:
        raise EtaError(f"teacher.blocks: '{missing[0]}' is not a child of {type(container).__name__} "
                       f"(children: {', '.join(order)})")
    idx = [order.index(leaf) for leaf in leaves]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise EtaError("teacher.blocks must be consecutive children of their container, in order")
    before += [m for _, m in children[: idx[0]]]
    after = [m for _, m in children[idx[-1] + 1:]] + after
    blocks = [m for _, m in children[idx[0]: idx[-1] + 1]]
    return StemBlocksHead(nn.Sequential(*before), blocks, nn.Sequential(*after), names)


def split_teacher(model: nn.Module, blocks: str | list[str] = "auto") -> StemBlocksHead:
    """Cut ``model`` into stem, replaceable blocks and head (``"auto"``, or a list of dotted block paths).

    The split starts in the model's train/eval mode; afterwards its mode is its own (``split.eval()``).
    """
    return _cut(model, blocks).train(model.training)


def _cut(model: nn.Module, blocks) -> StemBlocksHead:
    auto = _auto_split(model)
    if isinstance(blocks, str) and blocks == "auto":
        if auto is None:
            return _graph_split(model, graph_cut.find_blocks(model))
        return auto
    names = [blocks] if isinstance(blocks, str) else [str(b) for b in blocks]
    if not names:
        raise EtaError("teacher.blocks is empty: list at least one block, or use 'auto'")
    if len(set(names)) != len(names):
        raise EtaError(f"teacher.blocks lists a block twice: {', '.join(names)}")
    if auto is not None:
        return _regroup(model, auto, names)
    try:  # plain nn.Sequential chains keep their nn.Sequential stem and head
        return _split_sequential_chain(model, names)
    except EtaError:
        return _graph_split(model, names)


def _graph_split(model: nn.Module, names: list[str]) -> StemBlocksHead:
    stem, blocks, head = graph_cut.cut(model, names)
    return StemBlocksHead(stem, blocks, head, names)


# ---------------------------------------------------------------------------------------------
# shapes and features


def _first_param_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def block_io_shapes(split: StemBlocksHead, input_shape: tuple) -> list[tuple[tuple, tuple]]:
    """(input, output) shape of every block, without the batch dimension, for one input of ``input_shape``."""
    was_training = split.training
    split.eval()
    try:
        x = split.stem(torch.zeros(1, *input_shape, device=_first_param_device(split)))
        shapes = []
        for block in split.blocks:
            y = block(x)
            shapes.append((tuple(x.shape[1:]), tuple(y.shape[1:])))
            x = y
    except (RuntimeError, AssertionError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EtaError(f"the teacher does not accept inputs of shape {tuple(input_shape)}: {first_line}") from None
    finally:
        split.train(was_training)
    return shapes


def features_at_blocks(split: StemBlocksHead, x: torch.Tensor, block_indices) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's input and output of each asked block, from one forward pass that stops after the last."""
    wanted = {int(i) for i in block_indices}
    if not wanted:
        return {}
    if min(wanted) < 0 or max(wanted) >= len(split.blocks):
        raise IndexError(f"block indices {sorted(wanted)} out of range for {len(split.blocks)} blocks")
    features = {}
    x = split.stem(x)
    for i, block in enumerate(split.blocks[: max(wanted) + 1]):
        y = block(x)
        if i in wanted:
            features[i] = (x, y)
        x = y
    return features
