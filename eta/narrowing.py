"""The hidden channels of a teacher's own block, found so that the block can be narrowed.

A block's *interface* (its input and output channels) is fixed by its neighbours in the teacher;
everything between is hidden and can shrink (:mod:`eta.channels` cuts, copies and sorts by the
groups found here). Blocks of known classes are described by hand (timm's inverted residuals,
ResNet blocks and transformer blocks, torchvision's, and each operator family's own modules,
which the families register with :func:`register_describer`); any other conv block is traced by
Torch-Pruning's dependency graph.

Traced path: Torch-Pruning's groups are turned into the same members, not pruned with its own
functions, so slicing, sorting and functional slices share one code path with the hand-written
blocks. A traced group is used only if every tensor in it is indexed by the root's channels
unchanged (no concat/split offsets) and narrowing it alone leaves the block's input and output
shapes as they were; otherwise it is left at full width (logged).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Iterable, Mapping, Sequence

import torch
from timm.layers import GluMlp, Mlp, SwiGLU, make_divisible
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Attention, Block, ResPostBlock
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2, resnet as tv_resnet
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .channels import ChannelGroup, Member, describe_module, named_tensors, narrow_block, refuse, resolve_widths, validate_groups
from .errors import EtaError

log = logging.getLogger(__name__)

CHANNEL_DIVISOR = 4  # as the conv families: multiples of 4 keep small blocks from collapsing several expansions onto one width


# ---------------------------------------------------------------------------------------------
# descriptions


Describer = Callable[[nn.Module, str], tuple[ChannelGroup, ...]]
_DESCRIBERS: dict[type, Describer] = {}


def register_describer(cls: type, describer: Describer) -> None:
    """Describe blocks of exactly ``cls`` with ``describer(block, label)`` (subclasses may change forward)."""
    _DESCRIBERS[cls] = describer


def _sub(block: nn.Module, path: str, label: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise refuse(label, f"it has no '{path}'") from None


def _conv_or_linear(block, path, label) -> nn.Module:
    m = _sub(block, path, label)
    if isinstance(m, _ConvNd) and m.transposed:
        raise refuse(label, f"'{path}' is a transposed conv")
    if not isinstance(m, (_ConvNd, nn.Linear)):
        raise refuse(label, f"'{path}' is a {type(m).__name__}, not a conv or linear layer")
    if isinstance(m, _ConvNd) and m.groups != 1:
        raise refuse(label, f"'{path}' is a grouped conv ({m.groups} groups); a channel prefix would cut across its groups")
    return m


def _out(block, path, label) -> list[Member]:
    """Output channels of a conv or linear layer: weight rows and bias."""
    m = _conv_or_linear(block, path, label)
    return [Member(f"{path}.weight", 0)] + ([Member(f"{path}.bias", 0)] if m.bias is not None else [])


def _in(block, path, label) -> list[Member]:
    """Input channels of a conv or linear layer: weight columns (its bias follows its outputs)."""
    _conv_or_linear(block, path, label)
    return [Member(f"{path}.weight", 1)]


def _depthwise(block, path, label) -> list[Member]:
    m = _sub(block, path, label)
    if not isinstance(m, _ConvNd) or m.transposed or not m.groups == m.in_channels == m.out_channels:
        raise refuse(label, f"'{path}' is not a depthwise conv with one filter per channel")
    return [Member(f"{path}.weight", 0)] + ([Member(f"{path}.bias", 0)] if m.bias is not None else [])


def _norm(block, path, label, unit: int = 1) -> list[Member]:
    """A per-channel norm in a hidden position: BatchNorm (timm's BatchNormAct2d too) or an affine 1-d LayerNorm."""
    m = _sub(block, path, label)
    if isinstance(m, _BatchNorm):
        return [Member(f"{path}.{t}", 0, 1, unit) for t in ("weight", "bias", "running_mean", "running_var")
                if getattr(m, t, None) is not None]
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.weight is not None:
        return [Member(f"{path}.{t}", 0, 1, unit) for t in ("weight", "bias") if getattr(m, t) is not None]
    raise refuse(label, f"'{path}' is a {type(m).__name__}; only BatchNorm and affine LayerNorm can sit on hidden channels")


def _tensor_free(block, path, label) -> None:
    """A layer on hidden channels that has no weights, so it follows any width (activations, DropBlock, AvgPool)."""
    m = getattr(block, path, None)
    if m is not None and (any(True for _ in m.parameters()) or any(True for _ in m.buffers())):
        raise refuse(label, f"'{path}' ({type(m).__name__}) holds per-channel tensors on hidden channels")


def _group(name: str, members: Iterable[Member], reader: Member, full: int, **kw) -> ChannelGroup:
    return ChannelGroup(name, tuple(dict.fromkeys(members)), reader, int(full), **kw)


# --- timm ------------------------------------------------------------------------------------


def _timm_inverted_residual(block, label):
    """MBConv: the expansion channels of conv_pw / conv_dw, and SE's input and output (its reduced width stays)."""
    members = [*_out(block, "conv_pw", label), *_norm(block, "bn1", label), *_depthwise(block, "conv_dw", label),
               *_norm(block, "bn2", label)]
    _tensor_free(block, "aa", label)
    if not isinstance(block.se, nn.Identity):
        if type(block.se) is not SqueezeExcite:
            raise refuse(label, f"its SE module is a {type(block.se).__name__}; only timm's SqueezeExcite is described")
        members += [*_in(block, "se.conv_reduce", label), *_out(block, "se.conv_expand", label)]
    members += _in(block, "conv_pwl", label)
    return (_group("expansion", members, Member("conv_pwl.weight", 1), block.conv_pw.out_channels),)


def _no_hidden(block, label):
    """A block whose every channel is on its interface (depthwise-separable conv, MobileNetV2 t=1)."""
    return ()


def _resnet_basic(block, label):
    """ResNet basic block: conv1's outputs, bn1, conv2's inputs (conv2's outputs are the interface)."""
    for path in ("drop_block", "aa"):
        _tensor_free(block, path, label)
    members = [*_out(block, "conv1", label), *_norm(block, "bn1", label), *_in(block, "conv2", label)]
    return (_group("mid", members, Member("conv2.weight", 1), block.conv1.out_channels),)


def _resnet_bottleneck(block, label):
    """ResNet bottleneck: conv1 -> conv2 and conv2 -> conv3; a grouped conv2 (ResNeXt) is refused."""
    for path in ("drop_block", "aa"):
        _tensor_free(block, path, label)
    first = [*_out(block, "conv1", label), *_norm(block, "bn1", label), *_in(block, "conv2", label)]
    second = [*_out(block, "conv2", label), *_norm(block, "bn2", label), *_in(block, "conv3", label)]
    return (_group("mid1", first, Member("conv2.weight", 1), block.conv1.out_channels),
            _group("mid2", second, Member("conv3.weight", 1), block.conv2.out_channels))


def _vit_block(block, label):
    """Transformer block: attention heads (whole heads) and MLP hidden width, two groups."""
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise refuse(label, f"its attention is a {type(attn).__name__}; only timm's Attention is described")
    hd = attn.head_dim
    heads = [Member("attn.qkv.weight", 0, 3, hd)] + ([Member("attn.qkv.bias", 0, 3, hd)] if attn.qkv.bias is not None else [])
    if not isinstance(attn.norm, nn.Identity):  # scale_norm: a LayerNorm over all heads' outputs
        heads += _norm(block, "attn.norm", label, unit=hd)
    if attn.gate is not None:
        heads += [Member("attn.gate.weight", 0, 1, hd)] + ([Member("attn.gate.bias", 0, 1, hd)] if attn.gate.bias is not None else [])
    heads += [Member("attn.proj.weight", 1, 1, hd)]
    # q_norm / k_norm normalise each head's head_dim vector: removing whole heads does not touch them
    groups = [_group("heads", heads, Member("attn.proj.weight", 1, 1, hd), attn.num_heads, heads=True, owner="attn")]

    norm = [] if isinstance(mlp.norm, nn.Identity) else _norm(block, "mlp.norm", label)
    if type(mlp) is Mlp:
        hidden = [*_out(block, "mlp.fc1", label), *norm, *_in(block, "mlp.fc2", label)]
        full = mlp.fc1.weight.shape[0]
    elif type(mlp) is GluMlp:  # fc1 holds [value | gate]; the prefix is cut in both halves
        _conv_or_linear(block, "mlp.fc1", label)
        hidden = [Member("mlp.fc1.weight", 0, 2)] + ([Member("mlp.fc1.bias", 0, 2)] if mlp.fc1.bias is not None else [])
        hidden += [*norm, *_in(block, "mlp.fc2", label)]
        full = mlp.fc1.weight.shape[0] // 2
    elif type(mlp) is SwiGLU:
        hidden = [*_out(block, "mlp.fc1_g", label), *_out(block, "mlp.fc1_x", label), *norm, *_in(block, "mlp.fc2", label)]
        full = mlp.fc2.weight.shape[1]
    else:
        raise refuse(label, f"its MLP is a {type(mlp).__name__}; timm's Mlp, GluMlp and SwiGLU are described")
    groups.append(_group("mlp", hidden, Member("mlp.fc2.weight", 1), full))
    return tuple(groups)


# --- torchvision -----------------------------------------------------------------------------


def _tv_inverted_residual(block, label):
    """MobileNetV2 block: conv = [expand CNA, depthwise CNA, project conv, BN]; t=1 has no expand and no hidden width."""
    if len(block.conv) == 3:
        return ()
    if len(block.conv) != 4:
        raise refuse(label, f"its conv Sequential has {len(block.conv)} layers, not torchvision's 3 or 4")
    members = [*_out(block, "conv.0.0", label), *_norm(block, "conv.0.1", label), *_depthwise(block, "conv.1.0", label),
               *_norm(block, "conv.1.1", label), *_in(block, "conv.2", label)]
    return (_group("expansion", members, Member("conv.2.weight", 1), block.conv[0][0].out_channels),)


for _cls, _describer in {InvertedResidual: _timm_inverted_residual, DepthwiseSeparableConv: _no_hidden,
                         BasicBlock: _resnet_basic, Bottleneck: _resnet_bottleneck, Block: _vit_block, ResPostBlock: _vit_block,
                         tv_resnet.BasicBlock: _resnet_basic, tv_resnet.Bottleneck: _resnet_bottleneck,
                         tv_mobilenetv2.InvertedResidual: _tv_inverted_residual}.items():
    register_describer(_cls, _describer)


def describe_block(block: nn.Module, example_input: torch.Tensor | None = None, *, name: str | None = None) -> tuple[ChannelGroup, ...]:
    """The hidden channel groups of ``block`` (never its input or output channels); ``()`` if it has none.

    Known block classes are described by hand; any other is traced with Torch-Pruning on
    ``example_input`` (a batch the block accepts). ``name`` (the block's path in the teacher) is
    only used in error messages.
    """
    label = describe_module(block, name)
    describer = _DESCRIBERS.get(type(block))
    if describer is not None:
        groups = describer(block, label)
    elif example_input is None:
        raise refuse(label, "it is not a known block type; pass an example input so Torch-Pruning can trace it")
    else:
        groups = describe_traced(block, example_input, name=name)
    validate_groups(block, groups, label)
    return tuple(groups)


# --- any other conv block: Torch-Pruning's dependency graph -----------------------------------


def dependency_graph(module: nn.Module, example_input: torch.Tensor, label: str):
    """(torch_pruning, its dependency graph of ``module``); ``module`` must be a copy: Torch-Pruning hooks it
    and switches it to eval."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise refuse(label, "it is not a known block type and torch-pruning is not installed "
                             "(pip install --no-deps torch-pruning==1.6.1)") from None
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(module, example_inputs=example_input, verbose=False)
    except Exception as err:  # noqa: BLE001 - tracing runs the user's forward: any error means "cannot trace"
        first_line = (str(err).strip().splitlines() or [""])[0][:120]
        raise refuse(label, f"Torch-Pruning cannot trace it ({type(err).__name__}: {first_line})") from None
    return tp, graph


def traced_groups(module: nn.Module, example_input: torch.Tensor, label: str):
    """Every channel group Torch-Pruning finds in a copy of ``module``, as eta's members:
    yields (root layer path, members, reader, full, producer paths) or (root layer path, why it cannot be a prefix group)."""
    work = copy.deepcopy(module).eval()
    tp, graph = dependency_graph(work, example_input, label)
    names = {m: n for n, m in work.named_modules()}
    tensors = named_tensors(work)
    for tp_group in graph.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        root = names.get(tp_group[0].dep.target.module, "?")
        found = members_of_tp_group(tp, graph, tp_group, names, tensors)
        yield (root, found) if isinstance(found, str) else (root, *found)


def describe_traced(block: nn.Module, example_input: torch.Tensor, *, name: str | None = None) -> tuple[ChannelGroup, ...]:
    """Hidden groups of any conv/linear block found by Torch-Pruning, the block's interface held fixed."""
    label = describe_module(block, name)
    order = {n: i for i, (n, _) in enumerate(block.named_modules())}
    groups = []
    for root, *found in traced_groups(block, example_input, label):
        if len(found) == 1:
            log.info("%s: channels of '%s' stay at full width: %s", label, root, found[0])
            continue
        members, reader, full, producers = found
        first = min(producers, key=order.__getitem__) if producers else root  # named after its first writer, in module order
        groups.append(_group(f"{first}#{len(groups)}" if any(g.name == first for g in groups) else first, members, reader, full))
    kept = []
    for g in groups:
        reason = _interface_change(block, (g,), {g.name: _probe_width(g.full)}, example_input)
        if reason:
            log.info("%s: channels of '%s' stay at full width: narrowing them %s", label, g.name, reason)
        else:
            kept.append(g)
    log.info("%s: %d hidden group(s) traced: %s", label, len(kept), ", ".join(f"{g.name} ({g.full})" for g in kept) or "none")
    return tuple(kept)


def members_of_tp_group(tp, graph, tp_group, names, tensors):
    """(members, reader, full, producer layers) of one Torch-Pruning group, or why it cannot be a prefix group."""
    O = tp.ops.OPTYPE
    passive = {O.ELEMENTWISE, O.RESHAPE, O.CONCAT, O.SPLIT, O.SLICE, O.UNBIND, O.EXPAND}
    full = len(tp_group[0].idxs)
    members, readers, producers = [], [], []
    for item in tp_group.items:
        node, handler = item.dep.target, item.dep.handler
        idxs, root = list(item.idxs), list(item.root_idxs if item.root_idxs is not None else item.idxs)
        if idxs != root or sorted(idxs) != list(range(full)):
            return "its channels reach some tensor at other positions (concat, split or a partial coupling)"
        if node.type == O.OUTPUT:
            return "they reach the traced module's output"
        if node.type in passive:
            continue
        m = node.module
        path = names.get(m) if isinstance(m, nn.Module) else None
        if path is None:
            return f"they reach a tensor that is not a layer of the block ({type(m).__name__})"
        prefix = f"{path}." if path else ""
        if node.type in (O.CONV, O.LINEAR):
            if node.type == O.CONV and (m.transposed or m.groups != 1):
                return f"'{path}' is a transposed or grouped conv"
            if graph.is_out_channel_pruning_fn(handler):  # its outputs (rows and bias) are the channels
                members += [Member(prefix + "weight", 0)] + ([Member(prefix + "bias", 0)] if m.bias is not None else [])
                producers.append(path)
            else:  # it reads them (columns)
                members.append(Member(prefix + "weight", 1))
                readers.append(members[-1])
        elif node.type == O.DEPTHWISE_CONV:
            if m.transposed or m.in_channels != m.out_channels:
                return f"'{path}' is a depthwise conv with a channel multiplier"
            members += [Member(prefix + "weight", 0)] + ([Member(prefix + "bias", 0)] if m.bias is not None else [])
        elif node.type == O.BN:
            members += [Member(prefix + t, 0) for t in ("weight", "bias", "running_mean", "running_var")
                        if getattr(m, t, None) is not None]
        elif node.type == O.LN:
            if len(m.normalized_shape) != 1 or m.weight is None:
                return f"'{path}' is a LayerNorm over more than one dim or without weights"
            members += [Member(prefix + t, 0) for t in ("weight", "bias") if getattr(m, t) is not None]
        elif node.type == O.PRELU:
            if m.num_parameters > 1:
                members.append(Member(prefix + "weight", 0))
        else:
            return f"'{path}' ({type(m).__name__}) is not a layer eta narrows"
    members = list(dict.fromkeys(members))
    for mem in members:
        if tensors[mem.name].shape[mem.dim] != full:
            return f"'{mem.name}' is {tensors[mem.name].shape[mem.dim]} wide, not {full}"
    if not members:
        return "no tensor is indexed by them"
    return members, (readers[0] if readers else members[0]), full, producers


# ---------------------------------------------------------------------------------------------
# widths


def hidden_widths(groups: Sequence[ChannelGroup], expansion: float, *, heads: int | None = None,
                  divisor: int = CHANNEL_DIVISOR) -> dict[str, int]:
    """Width of every group at ``expansion`` (a fraction in (0, 1] of the teacher's own width).

    Channel groups: ``make_divisible(e * full, divisor)`` (a multiple of ``divisor``, at least
    ``divisor``), capped at ``full``; exactly ``full`` at 1.0. Head groups keep ``heads`` heads if
    given, else ``round(e * heads) >= 1``: one expansion thins a transformer block uniformly.
    """
    e = float(expansion)
    if not 0 < e <= 1:
        raise EtaError(f"expansion {expansion:g} of a teacher block must be in (0, 1]")
    out = {}
    for g in groups:
        if g.heads:
            h = int(heads) if heads is not None else max(1, int(e * g.full + 0.5))
            if not 1 <= h <= g.full:
                raise EtaError(f"{h} heads asked of hidden group '{g.name}', which has {g.full}")
            out[g.name] = h
        else:
            out[g.name] = g.full if e == 1 else min(g.full, int(make_divisible(e * g.full, divisor=divisor)))
    return out


@torch.no_grad()
def _interface_change(block, groups, widths, example_input) -> str | None:
    """Why narrowing ``groups`` to ``widths`` changes what the block accepts or returns, or None."""
    was = block.training
    try:
        block.eval()
        expected = block(example_input).shape
        narrow = narrow_block(block, groups, resolve_widths(groups, widths)).eval()
        got = narrow(example_input).shape
    except Exception as err:  # noqa: BLE001 - a shape error anywhere in the user's forward
        return f"breaks its forward ({type(err).__name__})"
    finally:
        block.train(was)
    return None if got == expected else f"changes its output from {tuple(expected)} to {tuple(got)}"


def _probe_width(full: int) -> int:
    """A narrower width that cannot hide a wrong cut by broadcasting (as a width of 1 would against a residual)."""
    return max(2, full // 2) if full > 2 else 1


def check_interface(block: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor, *,
                    widths: Mapping[str, int] | None = None, name: str | None = None) -> None:
    """Raise unless the block narrowed to ``widths`` (default: about half of every group) still takes
    ``example_input`` and keeps its output shape: the cut stayed inside the block."""
    widths = {g.name: _probe_width(g.full) for g in groups} if widths is None else widths
    reason = _interface_change(block, groups, widths, example_input)
    if reason:
        raise refuse(describe_module(block, name), f"narrowing its hidden groups {reason}")
