"""Narrow a teacher's own block: its hidden channels ranked by importance and kept as a prefix.

A block's *interface* (its input and output channels) is fixed by its neighbours in the teacher;
everything between is hidden and can shrink. A :class:`HiddenGroup` names the tensors (and the
dimension of each) that one set of hidden channels indexes, so one prefix cut applied to all of
them gives a smaller block that still fits its neighbours. Groups of attention heads cut whole
heads (Q, K and V rows and the projection's columns of each head together), so head_dim, scale and
any per-head q/k norm stay as they are.

Three steps, kept apart as once-for-all does: :func:`describe_block` finds the groups (written by
hand for timm / torchvision / eta blocks, traced by Torch-Pruning's dependency graph for any other
conv block); :func:`sort_hidden_channels` permutes each group by importance (function-preserving at
full width); :func:`narrow_block` / :func:`sliced_tensors` cut a prefix. A narrow block is a deep
copy of the teacher's block (same classes, so forward and integer lowering still recognise it)
whose tensors and size attributes follow the cut; :class:`ElasticBlock` trains every width at once
by running a meta-device narrow copy through ``torch.func.functional_call`` on prefix views of the
full block's tensors, so gradients and BatchNorm statistics reach only the prefix.

Generic path: Torch-Pruning's groups are turned into the same members, not pruned with its own
functions, so slicing, sorting and functional slices share one code path with the hand-written
blocks. A traced group is used only if every tensor in it is indexed by the root's channels
unchanged (no concat/split offsets) and narrowing it alone leaves the block's input and output
shapes as they were; otherwise it is left at full width (logged).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import cache
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from timm.layers import make_divisible
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .errors import EtaError

log = logging.getLogger(__name__)

CHANNEL_DIVISOR = 4  # as eta.families.conv: multiples of 4 keep small blocks from collapsing several expansions onto one width


# ---------------------------------------------------------------------------------------------
# descriptions


class Member(NamedTuple):
    """One tensor dimension indexed by a group's units (channels or heads).

    The dimension holds ``chunks`` equal blocks (3 for a fused QKV projection), each made of the
    group's units in order, ``unit`` consecutive entries per unit (head_dim for heads).
    """

    name: str  # key in the block's state_dict
    dim: int
    chunks: int = 1
    unit: int = 1


@dataclass(frozen=True)
class HiddenGroup:
    """One set of hidden channels (or attention heads) of a block, cut and permuted together.

    ``reader`` is the member consuming the units (ranked by its L1 norm by default); ``full`` the
    teacher's width in units; ``owner`` the attention module whose ``num_heads`` follows the width.
    """

    name: str
    members: tuple[Member, ...]
    reader: Member
    full: int
    heads: bool = False
    owner: str | None = None


Describer = Callable[[nn.Module, str], tuple[HiddenGroup, ...]]
_DESCRIBERS: dict[type, Describer] = {}


def register_describer(cls: type, describer: Describer) -> None:
    """Describe blocks of exactly ``cls`` with ``describer(block, label)`` (subclasses may change forward)."""
    _DESCRIBERS[cls] = describer


def _label(block: nn.Module, name: str | None) -> str:
    kind = type(block).__name__
    return f"block '{name}' ({kind})" if name else f"block {kind}"


def _refuse(label: str, reason: str) -> EtaError:
    return EtaError(f"cannot narrow {label}: {reason}")


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state_dict key, plus non-persistent buffers (a meta copy then needs nothing of its own)."""
    out = {k: v for k, v in module.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
    for name, buf in module.named_buffers():
        out.setdefault(name, buf)
    return out


def _sub(block: nn.Module, path: str, label: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise _refuse(label, f"it has no '{path}'") from None


def _conv_or_linear(block, path, label) -> nn.Module:
    m = _sub(block, path, label)
    if isinstance(m, _ConvNd) and m.transposed:
        raise _refuse(label, f"'{path}' is a transposed conv")
    if not isinstance(m, (_ConvNd, nn.Linear)):
        raise _refuse(label, f"'{path}' is a {type(m).__name__}, not a conv or linear layer")
    if isinstance(m, _ConvNd) and m.groups != 1:
        raise _refuse(label, f"'{path}' is a grouped conv ({m.groups} groups); a channel prefix would cut across its groups")
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
        raise _refuse(label, f"'{path}' is not a depthwise conv with one filter per channel")
    return [Member(f"{path}.weight", 0)] + ([Member(f"{path}.bias", 0)] if m.bias is not None else [])


def _norm(block, path, label, unit: int = 1) -> list[Member]:
    """A per-channel norm in a hidden position: BatchNorm (timm's BatchNormAct2d too) or an affine 1-d LayerNorm."""
    m = _sub(block, path, label)
    if isinstance(m, _BatchNorm):
        return [Member(f"{path}.{t}", 0, 1, unit) for t in ("weight", "bias", "running_mean", "running_var")
                if getattr(m, t, None) is not None]
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.weight is not None:
        return [Member(f"{path}.{t}", 0, 1, unit) for t in ("weight", "bias") if getattr(m, t) is not None]
    raise _refuse(label, f"'{path}' is a {type(m).__name__}; only BatchNorm and affine LayerNorm can sit on hidden channels")


def _tensor_free(block, path, label) -> None:
    """A layer on hidden channels that has no weights, so it follows any width (activations, DropBlock, AvgPool)."""
    m = getattr(block, path, None)
    if m is not None and (any(True for _ in m.parameters()) or any(True for _ in m.buffers())):
        raise _refuse(label, f"'{path}' ({type(m).__name__}) holds per-channel tensors on hidden channels")


def _group(name: str, members: Iterable[Member], reader: Member, full: int, **kw) -> HiddenGroup:
    return HiddenGroup(name, tuple(dict.fromkeys(members)), reader, int(full), **kw)


# --- timm ------------------------------------------------------------------------------------


def _timm_inverted_residual(block, label):
    """MBConv: the expansion channels of conv_pw / conv_dw, and SE's input and output (its reduced width stays)."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    members = [*_out(block, "conv_pw", label), *_norm(block, "bn1", label), *_depthwise(block, "conv_dw", label),
               *_norm(block, "bn2", label)]
    _tensor_free(block, "aa", label)
    if not isinstance(block.se, nn.Identity):
        if type(block.se) is not SqueezeExcite:
            raise _refuse(label, f"its SE module is a {type(block.se).__name__}; only timm's SqueezeExcite is described")
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
    from timm.layers import GluMlp, Mlp, SwiGLU
    from timm.models.vision_transformer import Attention

    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise _refuse(label, f"its attention is a {type(attn).__name__}; only timm's Attention is described")
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
        raise _refuse(label, f"its MLP is a {type(mlp).__name__}; timm's Mlp, GluMlp and SwiGLU are described")
    groups.append(_group("mlp", hidden, Member("mlp.fc2.weight", 1), full))
    return tuple(groups)


# --- torchvision -----------------------------------------------------------------------------


def _tv_inverted_residual(block, label):
    """MobileNetV2 block: conv = [expand CNA, depthwise CNA, project conv, BN]; t=1 has no expand and no hidden width."""
    if len(block.conv) == 3:
        return ()
    if len(block.conv) != 4:
        raise _refuse(label, f"its conv Sequential has {len(block.conv)} layers, not torchvision's 3 or 4")
    members = [*_out(block, "conv.0.0", label), *_norm(block, "conv.0.1", label), *_depthwise(block, "conv.1.0", label),
               *_norm(block, "conv.1.1", label), *_in(block, "conv.2", label)]
    return (_group("expansion", members, Member("conv.2.weight", 1), block.conv[0][0].out_channels),)


# --- eta's own operators ---------------------------------------------------------------------


def _from_channel_groups(channel_groups: Callable[[nn.Module], Sequence]) -> Describer:
    """eta's operator families already name their modules' hidden tensors (``ChannelGroup``): reuse them."""
    def describe(block, label):
        tensors = _named_tensors(block)
        groups = []
        for i, cg in enumerate(channel_groups(block)):
            unit = int(getattr(cg, "unit", 1))  # channels that move together (an attention head)
            members = [Member(n, d, 1, unit) for n, d in cg.members]
            first = members[0]
            groups.append(_group(f"hidden{i}", members, Member(*cg.reader, 1, unit), tensors[first.name].shape[first.dim] // unit))
        return tuple(groups)

    return describe


def _eta_describers() -> dict[type, Describer]:
    """Modules of eta's registered operator families (``eta.families``), described by the families' own channel groups."""
    table: dict[type, Describer] = {}
    try:
        from . import families

        for fam in families.families():
            cls = getattr(fam, "module", None)
            if isinstance(cls, type) and cls is not nn.Module:
                table[cls] = _from_channel_groups(fam.channel_groups)
    except Exception as err:  # noqa: BLE001 - a broken family module must not stop timm/torchvision blocks from narrowing
        log.warning("eta's own operators cannot be narrowed (eta.families: %s)", err)
    return table


@cache
def _builtin_describers() -> dict[type, Describer]:
    """Imported on first use: torchvision and eta's families are only needed when their blocks are narrowed."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block, ResPostBlock

    table: dict[type, Describer] = _eta_describers()
    table.update({
        InvertedResidual: _timm_inverted_residual, DepthwiseSeparableConv: _no_hidden,
        BasicBlock: _resnet_basic, Bottleneck: _resnet_bottleneck, Block: _vit_block, ResPostBlock: _vit_block,
    })  # timm's blocks by hand even where a family builds them (vit's Block): heads are described only here
    try:
        from torchvision.models import mobilenetv2, resnet

        table.update({resnet.BasicBlock: _resnet_basic, resnet.Bottleneck: _resnet_bottleneck,
                      mobilenetv2.InvertedResidual: _tv_inverted_residual})
    except ImportError:
        log.debug("torchvision is not installed: its blocks go to the generic path")
    return table


def describe_block(block: nn.Module, example_input: torch.Tensor | None = None, *, name: str | None = None) -> tuple[HiddenGroup, ...]:
    """The hidden channel groups of ``block`` (never its input or output channels); ``()`` if it has none.

    Known block classes are described by hand; any other is traced with Torch-Pruning on
    ``example_input`` (a batch the block accepts). ``name`` (the block's path in the teacher) is
    only used in error messages.
    """
    label = _label(block, name)
    describer = _DESCRIBERS.get(type(block)) or _builtin_describers().get(type(block))
    if describer is not None:
        groups = describer(block, label)
    elif example_input is None:
        raise _refuse(label, "it is not a known block type; pass an example input so Torch-Pruning can trace it")
    else:
        groups = describe_traced(block, example_input, name=name)
    _validate(block, groups, label)
    return tuple(groups)


def _validate(block: nn.Module, groups: Sequence[HiddenGroup], label: str) -> None:
    tensors = _named_tensors(block)
    names, cut = set(), set()
    for g in groups:
        if g.name in names:
            raise _refuse(label, f"two hidden groups are called '{g.name}'")
        names.add(g.name)
        if g.full < 1 or g.reader not in g.members:
            raise _refuse(label, f"hidden group '{g.name}' has width {g.full} or a reader outside its members")
        for m in g.members:
            t = tensors.get(m.name)
            if t is None:
                raise _refuse(label, f"hidden group '{g.name}' names '{m.name}', which the block does not have")
            if t.dim() <= m.dim or t.shape[m.dim] != m.chunks * g.full * m.unit:
                raise _refuse(label, f"'{m.name}' is not {m.chunks}x{g.full}x{m.unit} wide along dim {m.dim}")
            if m.chunks > 1 and not isinstance(t, nn.Parameter):
                raise _refuse(label, f"buffer '{m.name}' would be cut in chunks, which cannot be a view")
            if (m.name, m.dim) in cut:
                raise _refuse(label, f"'{m.name}' dim {m.dim} belongs to two hidden groups")
            cut.add((m.name, m.dim))


# --- any other conv block: Torch-Pruning's dependency graph -----------------------------------


def describe_traced(block: nn.Module, example_input: torch.Tensor, *, name: str | None = None) -> tuple[HiddenGroup, ...]:
    """Hidden groups of any conv/linear block found by Torch-Pruning, the block's interface held fixed."""
    label = _label(block, name)
    try:
        import torch_pruning as tp
    except ImportError:
        raise _refuse(label, "it is not a known block type and torch-pruning is not installed "
                             "(pip install --no-deps torch-pruning==1.6.1)") from None
    work = copy.deepcopy(block).eval()  # Torch-Pruning hooks and switches the traced model to eval: never the caller's
    names = {m: n for n, m in work.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(work, example_inputs=example_input, verbose=False)
    except Exception as err:  # noqa: BLE001 - tracing runs the user's forward: any error means "cannot trace"
        first_line = (str(err).strip().splitlines() or [""])[0][:120]
        raise _refuse(label, f"Torch-Pruning cannot trace it ({type(err).__name__}: {first_line})") from None
    tensors = _named_tensors(work)
    groups = []
    for tp_group in graph.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        found = _from_tp_group(tp, graph, tp_group, names, tensors)
        root = names.get(tp_group[0].dep.target.module, "?")
        if isinstance(found, str):
            log.info("%s: channels of '%s' stay at full width: %s", label, root, found)
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


def _from_tp_group(tp, graph, tp_group, names, tensors):
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
            return "they are the block's output channels"
        if node.type in passive:
            continue
        m = node.module
        path = names.get(m) if isinstance(m, nn.Module) else None
        if path is None:
            return f"they reach a tensor that is not a layer of the block ({type(m).__name__})"
        prefix = f"{path}." if path else ""
        if node.type == O.CONV:
            if m.transposed or m.groups != 1:
                return f"'{path}' is a transposed or grouped conv"
            if graph.is_out_channel_pruning_fn(handler):
                members += [Member(prefix + "weight", 0)] + ([Member(prefix + "bias", 0)] if m.bias is not None else [])
                producers.append(path)
            else:
                members.append(Member(prefix + "weight", 1))
                readers.append(members[-1])
        elif node.type == O.DEPTHWISE_CONV:
            if m.transposed or m.in_channels != m.out_channels:
                return f"'{path}' is a depthwise conv with a channel multiplier"
            members += [Member(prefix + "weight", 0)] + ([Member(prefix + "bias", 0)] if m.bias is not None else [])
        elif node.type == O.LINEAR:
            if graph.is_out_channel_pruning_fn(handler):
                members += [Member(prefix + "weight", 0)] + ([Member(prefix + "bias", 0)] if m.bias is not None else [])
                producers.append(path)
            else:
                members.append(Member(prefix + "weight", 1))
                readers.append(members[-1])
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


def hidden_widths(groups: Sequence[HiddenGroup], expansion: float, *, heads: int | None = None,
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


def _resolve_widths(groups: Sequence[HiddenGroup], widths: Mapping[str, int] | float) -> dict[str, int]:
    if not isinstance(widths, Mapping):
        return hidden_widths(groups, widths)
    by_name = {g.name: g for g in groups}
    unknown = set(widths) - set(by_name)
    if unknown:
        raise EtaError(f"widths name unknown hidden groups {sorted(unknown)} (groups: {sorted(by_name)})")
    out = {}
    for g in groups:
        w = int(widths.get(g.name, g.full))
        if not 1 <= w <= g.full:
            raise EtaError(f"width {w} of hidden group '{g.name}' is outside 1..{g.full}")
        out[g.name] = w
    return out


# ---------------------------------------------------------------------------------------------
# prefixes


def _take_prefix(t: torch.Tensor, m: Member, full: int, width: int) -> torch.Tensor:
    """The first ``width`` units of ``t`` along ``m.dim`` (in every chunk): a view unless chunks > 1."""
    if width == full:
        return t
    if m.chunks == 1:
        return t.narrow(m.dim, 0, width * m.unit)
    shape = t.shape
    blocks = t.reshape(*shape[:m.dim], m.chunks, full * m.unit, *shape[m.dim + 1:])
    return blocks.narrow(m.dim + 1, 0, width * m.unit).flatten(m.dim, m.dim + 1)


def _cuts(groups: Sequence[HiddenGroup], widths: Mapping[str, int]) -> dict[str, list[tuple[Member, int, int]]]:
    cuts: dict[str, list[tuple[Member, int, int]]] = {}
    for g in groups:
        for m in g.members:
            cuts.setdefault(m.name, []).append((m, g.full, widths[g.name]))
    return cuts


def sliced_tensors(full_block: nn.Module, groups: Sequence[HiddenGroup], widths: Mapping[str, int] | float) -> dict[str, torch.Tensor]:
    """``full_block``'s tensors keyed like its state_dict, each cut to the prefix widths (views: gradients reach only the prefix)."""
    widths = _resolve_widths(groups, widths)
    cuts = _cuts(groups, widths)
    out = {}
    for name, t in _named_tensors(full_block).items():
        for m, full, width in cuts.get(name, ()):
            t = _take_prefix(t, m, full, width)
        out[name] = t
    return out


def _copy_with(block: nn.Module, groups, widths: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``block`` holding ``tensors`` in place of its own, size attributes fixed to match."""
    memo = {}
    for name, old in _named_tensors(block).items():
        if id(old) in memo:  # tied tensors stay tied
            continue
        new = tensors[name]
        memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    narrow = copy.deepcopy(block, memo)
    _fix_attributes(narrow, groups, widths)
    return narrow


def _fix_attributes(module: nn.Module, groups: Sequence[HiddenGroup], widths: Mapping[str, int]) -> None:
    """Size attributes that forward (or a later exporter) reads, set from the tensors' new shapes."""
    for m in module.modules():
        if isinstance(m, _ConvNd):
            w = m.weight.shape
            if m.groups == m.in_channels == m.out_channels and m.groups > 1:  # depthwise: groups follow the channels
                m.in_channels = m.out_channels = m.groups = w[0]
            elif m.groups == 1:
                m.out_channels, m.in_channels = (w[1], w[0]) if m.transposed else (w[0], w[1])
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, _BatchNorm):
            ref = m.running_mean if m.running_mean is not None else m.weight
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()
        elif isinstance(m, nn.Sequential) and isinstance(getattr(m, "out_channels", None), int) and len(m) \
                and isinstance(m[0], _ConvNd):  # torchvision's ConvNormActivation records its width
            m.out_channels = m[0].out_channels
    for g in groups:
        if g.owner is not None:
            attn = module.get_submodule(g.owner)
            attn.num_heads = widths[g.name]
            if hasattr(attn, "attn_dim"):
                attn.attn_dim = widths[g.name] * attn.head_dim  # head_dim and scale do not change


def narrow_meta(block: nn.Module, widths: Mapping[str, int] | float, groups: Sequence[HiddenGroup] | None = None) -> nn.Module:
    """The narrow block on the meta device (no weights): run it with ``functional_call`` on :func:`sliced_tensors`."""
    groups = describe_block(block) if groups is None else groups
    widths = _resolve_widths(groups, widths)
    cuts = _cuts(groups, widths)
    meta = {}
    for name, t in _named_tensors(block).items():
        t = torch.empty_like(t, device="meta")
        for m, full, width in cuts.get(name, ()):
            t = _take_prefix(t, m, full, width)
        meta[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return _copy_with(block, groups, widths, meta)


@torch.no_grad()
def narrow_block(block: nn.Module, widths: Mapping[str, int] | float, groups: Sequence[HiddenGroup] | None = None) -> nn.Module:
    """A standalone copy of ``block`` keeping the first ``widths[g]`` units of each hidden group, weights copied.

    ``widths`` maps group names to widths, or is an expansion for :func:`hidden_widths`.
    """
    groups = describe_block(block) if groups is None else groups
    widths = _resolve_widths(groups, widths)
    state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sliced_tensors(block, groups, widths).items()}
    return _copy_with(block, groups, widths, state).train(block.training)


def check_slice_layout(narrow: nn.Module, sliced: Mapping[str, torch.Tensor], name: str | None = None) -> None:
    """Guard that a narrow module's tensors match the slices by key and shape, and its size attributes its tensors."""
    label = _label(narrow, name)
    own = _named_tensors(narrow)
    if own.keys() != sliced.keys():
        raise _refuse(label, f"its tensors {sorted(own.keys() ^ sliced.keys())[:3]} differ from the slice's")
    for k, t in own.items():
        if t.shape != sliced[k].shape:
            raise _refuse(label, f"'{k}' is {tuple(t.shape)} in the narrow module but {tuple(sliced[k].shape)} in the slice")
    for path, m in narrow.named_modules():
        expect = None
        if isinstance(m, _ConvNd) and not m.transposed:
            expect = (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.Linear):
            expect = (m.out_features, m.in_features)
        if expect is not None and tuple(m.weight.shape[:2]) != expect:
            raise _refuse(label, f"'{path}' says {expect} channels but holds weights of shape {tuple(m.weight.shape)}")


@torch.no_grad()
def _interface_change(block, groups, widths, example_input) -> str | None:
    """Why narrowing ``groups`` to ``widths`` changes what the block accepts or returns, or None."""
    was = block.training
    try:
        block.eval()
        expected = block(example_input).shape
        narrow = narrow_block(block, widths, groups).eval()
        got = narrow(example_input).shape
    except Exception as err:  # noqa: BLE001 - a shape error anywhere in the user's forward
        return f"breaks its forward ({type(err).__name__})"
    finally:
        block.train(was)
    return None if got == expected else f"changes its output from {tuple(expected)} to {tuple(got)}"


def _probe_width(full: int) -> int:
    """A narrower width that cannot hide a wrong cut by broadcasting (as a width of 1 would against a residual)."""
    return max(2, full // 2) if full > 2 else 1


def check_interface(block: nn.Module, groups: Sequence[HiddenGroup], example_input: torch.Tensor, *,
                    widths: Mapping[str, int] | float | None = None, name: str | None = None) -> None:
    """Raise unless the block narrowed to ``widths`` (default: about half of every group) still takes
    ``example_input`` and keeps its output shape: the cut stayed inside the block."""
    widths = {g.name: _probe_width(g.full) for g in groups} if widths is None else widths
    reason = _interface_change(block, groups, widths, example_input)
    if reason:
        raise _refuse(_label(block, name), f"narrowing its hidden groups {reason}")


# ---------------------------------------------------------------------------------------------
# importance and sorting


Importance = Callable[[nn.Module, HiddenGroup], torch.Tensor]


def _per_unit(t: torch.Tensor, m: Member, full: int) -> torch.Tensor:
    """Sum of ``t`` over everything but the group's units: one score per channel (or head)."""
    return t.movedim(m.dim, 0).reshape(m.chunks, full, m.unit, -1).sum(dim=(0, 2, 3))


def l1_importance(block: nn.Module, group: HiddenGroup) -> torch.Tensor:
    """L1 norm of the weights that read each unit: how much the block's output depends on it."""
    t = _named_tensors(block)[group.reader.name].detach()
    return _per_unit(t.abs(), group.reader, group.full)


def taylor_importance(block: nn.Module, group: HiddenGroup) -> torch.Tensor:
    """First-order Taylor |w * dL/dw| over the group's parameters: the loss change if a unit were removed. Needs gradients."""
    score, seen = torch.zeros(group.full), False
    tensors = _named_tensors(block)
    for m in group.members:
        t = tensors[m.name]
        if isinstance(t, nn.Parameter) and t.grad is not None:
            score = score.to(t.device) + _per_unit((t.detach() * t.grad).abs(), m, group.full)
            seen = True
    if not seen:
        raise EtaError(f"Taylor importance of hidden group '{group.name}' needs gradients: run backward first")
    return score


def _permute_(t: torch.Tensor, m: Member, full: int, order: torch.Tensor) -> None:
    moved = t.movedim(m.dim, 0)
    units = moved.reshape(m.chunks, full, m.unit, *moved.shape[1:]).index_select(1, order.to(t.device))
    t.copy_(units.reshape(moved.shape).movedim(0, m.dim))


@torch.no_grad()
def sort_hidden_channels(block: nn.Module, groups: Sequence[HiddenGroup], optimizer: torch.optim.Optimizer | None = None,
                         importance: Importance = l1_importance) -> dict[str, torch.Tensor]:
    """Permute each group's units by descending importance, so every prefix keeps the most important ones.

    Function-preserving at full width. Gradients and ``optimizer``'s per-parameter state (Adam
    moments) move with their channel. Returns each group's order (new position -> old unit).
    """
    tensors = _named_tensors(block)
    orders = {}
    for g in groups:
        scores = importance(block, g)
        if scores.shape != (g.full,):
            raise EtaError(f"importance of hidden group '{g.name}' has shape {tuple(scores.shape)}, not ({g.full},)")
        order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
        for m in g.members:
            t = tensors[m.name]
            _permute_(t.data, m, g.full, order)
            if isinstance(t, nn.Parameter):
                if t.grad is not None:
                    _permute_(t.grad, m, g.full, order)
                state = optimizer.state.get(t, {}) if optimizer is not None else {}
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == t.shape:
                        _permute_(v, m, g.full, order)
        orders[g.name] = order
    return orders


# ---------------------------------------------------------------------------------------------
# the elastic super-operator


class ElasticBlock(nn.Module):
    """A teacher block at several expansions sharing the teacher's weights: the ``teacher`` family's super-operator.

    ``full`` is a deep copy of the teacher's block (the teacher itself stays the distillation
    target); a narrower expansion runs a meta-device narrow copy through ``functional_call`` on
    prefix views of ``full``'s tensors. ``heads`` optionally fixes the head count per expansion.
    Call :meth:`sort_channels` once before training, so every prefix starts from the teacher's most
    important channels rather than its first ones.
    """

    def __init__(self, block: nn.Module, expansions: Sequence[float], *, example_input: torch.Tensor | None = None,
                 heads: Mapping[float, int] | None = None, name: str | None = None, divisor: int = CHANNEL_DIVISOR):
        super().__init__()
        if not expansions:
            raise EtaError(f"the teacher operator of {_label(block, name)} needs at least one expansion")
        self.full = copy.deepcopy(block)
        self.groups = describe_block(self.full, example_input, name=name)
        self.expansions: tuple[float, ...] = tuple(sorted({float(e) for e in expansions}))
        heads = dict(heads or {})
        self.widths = {e: hidden_widths(self.groups, e, heads=heads.get(e), divisor=divisor) for e in self.expansions}
        self._narrow: dict[tuple, nn.Module] = {}  # plain dict: meta modules are neither state nor moved by .to()
        for w in self.widths.values():
            key = self._key(w)
            if key is not None and key not in self._narrow:
                self._narrow[key] = narrow_meta(self.full, w, self.groups)
                check_slice_layout(self._narrow[key], sliced_tensors(self.full, self.groups, w), name)
        if example_input is not None and self.groups:
            for w in {self._key(w): w for w in self.widths.values()}.values():
                check_interface(self.full, self.groups, example_input, widths=w, name=name)

    def _key(self, widths: Mapping[str, int]) -> tuple | None:
        """None at full width (run ``full`` itself)."""
        if all(widths[g.name] == g.full for g in self.groups):
            return None
        return tuple(sorted(widths.items()))

    def _check_expansion(self, expansion: float) -> float:
        e = float(expansion)
        if e not in self.widths:
            raise EtaError(f"expansion {expansion:g} is not one of this teacher operator's {list(self.expansions)}")
        return e

    def forward(self, x, expansion: float | None = None):
        e = self.expansions[-1] if expansion is None else self._check_expansion(expansion)
        key = self._key(self.widths[e])
        if key is None:
            return self.full(x)
        narrow = self._narrow[key].train(self.training)
        return functional_call(narrow, sliced_tensors(self.full, self.groups, self.widths[e]), (x,))

    def extract(self, expansion: float) -> nn.Module:
        """The block at ``expansion`` as a standalone module of the teacher's own class, weights copied."""
        e = self._check_expansion(expansion)
        return narrow_block(self.full, self.widths[e], self.groups).train(self.training)

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None, importance: Importance = l1_importance) -> None:
        """Reorder hidden channels (and heads) by importance; see :func:`sort_hidden_channels`."""
        sort_hidden_channels(self.full, self.groups, optimizer, importance)

    def sample_expansion(self, generator: torch.Generator) -> float:
        """A uniformly drawn expansion for one training step."""
        return self.expansions[int(torch.randint(len(self.expansions), (1,), generator=generator))]

    def extra_repr(self) -> str:
        widths = [",".join(f"{k}={v}" for k, v in self.widths[e].items()) or "-" for e in self.expansions]
        return f"{type(self.full).__name__}, expansions={list(self.expansions)}, widths={widths}"
