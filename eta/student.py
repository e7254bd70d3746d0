"""Students: the teacher's stem and head around one chosen operator per block.

Two ways to build the same network: *stitched* from phase-1 super-operators (each block's
operator extracted as a slice), or as a *skeleton* with fresh weights that a saved state dict
is loaded into (export and ``eta.load_student``). Both produce identical module trees, so
state dicts move freely between them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from . import families
from .arch import OpSpec, arch_width
from .bound import BoundSpace
from .elastic import build_super_ops, super_op_name
from .errors import EtaError
from .network import StemBlocksHead
from .quant.network import quant_skeleton, quantize_student


HEADS = "heads."  # the last block's phase-1 weights also hold the heads distilled for narrower interface widths


def block_super_ops(bound: BoundSpace, block: int, elastic: bool) -> nn.ModuleDict:
    """The super-operators phase 1 trains for one block (fresh weights), one set per interface width."""
    specs = bound.trainable_specs(block)
    ops: dict[str, nn.Module] = {}
    for w in sorted({s.width for s in specs}):
        ops.update(build_super_ops([s for s in specs if s.width == w], bound.slot(block, w), elastic))
    return nn.ModuleDict(dict(sorted(ops.items())))


def width_key(width: float) -> str:
    return f"x{width:g}".replace(".", "p")


def narrow_heads(bound: BoundSpace) -> nn.ModuleDict:
    """One head per interface width below 1, starting as the thinned teacher's (its dropped inputs cut away);
    phase 1 distils each to the teacher's logits, as the blocks to the teacher's features."""
    return nn.ModuleDict({width_key(w): copy.deepcopy(bound.head(w)) for w in bound.widths if w < 1})


def split_heads(state: dict) -> tuple[dict, dict]:
    """(operators' state, heads' state) of the last block's phase-1 weights."""
    ops = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    return ops, {k[len(HEADS):]: v for k, v in state.items() if k.startswith(HEADS)}


class OperatorBank:
    """Phase-1 weights of every block, loaded once; stitches students by slicing."""

    def __init__(self, bound: BoundSpace, states: list[dict], *, where: Path | None = None):
        self.bound = bound
        self.elastic = bound.space.pretrain.elastic
        self.blocks: list[nn.ModuleDict] = []
        self.heads = narrow_heads(bound).eval()
        for b, state in enumerate(states):
            ops = block_super_ops(bound, b, self.elastic)
            if b == len(states) - 1:
                state, heads = split_heads(state)
                if heads:
                    self.heads.load_state_dict(heads)
            if len(ops):
                try:
                    ops.load_state_dict(state)
                except RuntimeError as err:
                    at = f"{where}: block {b}" if where else f"phase-1 weights of block {b}"
                    raise EtaError(f"{at} does not match the search space: {str(err).splitlines()[0]}") from None
            self.blocks.append(ops.eval())

    def operator(self, block: int, spec: OpSpec) -> nn.Module:
        if not families.get(spec.family).is_trainable(spec.with_bits(32)):  # identity, the teacher's own block
            return self.bound.operator(block, spec)
        return self.blocks[block][super_op_name(spec, self.elastic)].extract(spec.expansion)

    def head(self, width: float) -> nn.Module:
        return self.bound.head(width) if width == 1 else self.heads[width_key(width)]

    def stitch(self, arch) -> StemBlocksHead:
        w = arch_width(arch)
        ops = [self.operator(b, spec) for b, spec in enumerate(arch)]
        return StemBlocksHead(copy.deepcopy(self.bound.stem(w)), ops, copy.deepcopy(self.head(w))).eval()


def skeleton(bound: BoundSpace, arch) -> StemBlocksHead:
    """A student with the right module tree and fresh weights, to load a saved state into."""
    w = arch_width(arch)
    ops = [bound.operator(b, spec) for b, spec in enumerate(arch)]
    return StemBlocksHead(copy.deepcopy(bound.stem(w)), ops, copy.deepcopy(bound.head(w)))


def arch_bits(arch) -> list[int]:
    return [int(spec.bits) for spec in arch]


def is_quantized(arch) -> bool:
    return any(b != 32 for b in arch_bits(arch))


def weights_skeleton(bound: BoundSpace, arch) -> nn.Module:
    """The module tree a finetuned student's saved weights load into (a QuantStudent when quantized)."""
    model = skeleton(bound, arch)
    if not is_quantized(arch):
        return model
    return quant_skeleton(model, arch_bits(arch))


def latency_network(bound: BoundSpace, arch, resolution: int | None = None) -> nn.Module:
    """The network whose latency stands for ``arch``: float, or its integer version calibrated on random data.

    Latency depends on shapes, not on weights or scales, so any calibration times the same module.
    """
    model = skeleton(bound, arch)
    if not is_quantized(arch):
        return model
    x = torch.randn(*bound.input_shape(resolution), generator=torch.Generator().manual_seed(0))
    return quantize_student(model, arch_bits(arch), [x])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module, arch=None) -> float:
    """Weight storage in MB at the bit-width each block runs at (stem and head at 32 bits)."""
    total_bits = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks.")) * 32
    if arch is None:
        return (total_bits + sum(p.numel() for p in model.blocks.parameters()) * 32) / 8 / 1e6
    for b, spec in enumerate(arch):
        total_bits += sum(p.numel() for p in model.blocks[b].parameters()) * spec.bits
    return total_bits / 8 / 1e6


def count_macs(model: nn.Module, input_shape: tuple) -> dict[str, int]:
    """Multiply-accumulates per top-level part (stem, blocks.i, head) for one input, via forward hooks."""
    macs: dict[str, int] = {}

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                n = out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, nn.Linear):
                n = out.numel() // out.shape[0] * mod.in_features
            else:
                return
            macs[name] = macs.get(name, 0) + n

        return fn

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            parts = name.split(".")
            top = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
            handles.append(mod.register_forward_hook(hook(top)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape[1:]))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


def bops(model: StemBlocksHead, arch, input_shape: tuple) -> float:
    """Bit operations: MACs × weight bits × activation bits, per block at its bit-width."""
    macs = count_macs(model, input_shape)
    total = 0.0
    for part, n in macs.items():
        bits = 32
        if part.startswith("blocks."):
            bits = arch[int(part.split(".")[1])].bits
        total += n * bits * bits
    return total
