"""A search space bound to its teacher: blocks, their shapes and the candidates each block admits.

The YAML names families and widths; which of them fit a given block depends on the block's input
and output shapes (identity only where they agree, convolutions on images, transformer blocks on
tokens). :class:`BoundSpace` resolves that once, and gives every block an ordered option list
that the encoding, the latency table and the optimiser all share.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .arch import OpSpec, arch_to_str
from .errors import EtaError
from .space import SearchSpace
from .teachers import TeacherSplit, block_io_shapes, build_teacher, split_teacher

log = logging.getLogger(__name__)

CONV_FAMILIES = ("ir", "fused", "basic", "bottleneck")


def fits(spec: OpSpec, in_shape: tuple, out_shape: tuple) -> bool:
    """Whether an operator can replace a block with these (batch-free) shapes."""
    if spec.family == "teacher":
        return True
    if spec.family == "identity":
        return tuple(in_shape) == tuple(out_shape)
    if spec.family == "vit":
        return len(in_shape) == 2 and tuple(in_shape) == tuple(out_shape) and in_shape[1] % max(spec.heads, 1) == 0
    if spec.family in CONV_FAMILIES:
        return len(in_shape) == 3 and len(out_shape) == 3 and in_shape[1] % out_shape[1] == 0 and in_shape[1] >= out_shape[1]
    return False


def _lowerable(block: nn.Module) -> bool:
    """Whether a teacher block has integer kernels (so the space may offer it at 8 or 4 bits)."""
    from .quant.qop import describe

    try:
        describe(block)
    except EtaError as err:
        log.info("teacher block %s stays float: %s", type(block).__name__, err)
        return False
    return True


def module_digest(module: nn.Module) -> str:
    """A short hash of a module's structure (not its weights): latency depends on structure only."""
    return hashlib.sha1(repr(module).encode()).hexdigest()[:12]


@dataclass
class BoundSpace:
    space: SearchSpace
    teacher: nn.Module
    split: TeacherSplit
    in_chans: int
    num_classes: int
    shapes: list  # per block (in_shape, out_shape) at data.resolution, batch-free
    options: list  # per block: list[OpSpec], fixed order

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, space: SearchSpace, *, in_chans: int, num_classes: int) -> "BoundSpace":
        # seeded initialisation: a teacher eta trains itself is the same network in every run of a seed
        # (torch's global seed differs per process here), without disturbing the caller's random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(space.seed)
            teacher = build_teacher(space.teacher.model, num_classes=num_classes, in_chans=in_chans, kwargs=space.teacher.kwargs)
        teacher.eval()
        split = split_teacher(teacher, space.teacher.blocks)
        res = space.data.resolution
        shapes = [(tuple(i), tuple(o)) for i, o in block_io_shapes(split, (in_chans, res, res))]
        specs = space.op_specs()
        options = []
        for b, (ins, outs) in enumerate(shapes):
            opts = [s for s in specs if fits(s, ins, outs) and (s.bits == 32 or s.family != "teacher" or _lowerable(split.blocks[b]))]
            if not opts:
                raise EtaError(f"block {b} ({split.block_names[b]}, {ins}->{outs}): no operator of the pool fits; add 'teacher' or a matching family")
            options.append(opts)
        unfit = {s.family for s in specs} - {s.family for opts in options for s in opts}
        for fam in sorted(unfit):
            log.warning("operator family '%s' fits no block of this teacher and is ignored", fam)
        return cls(space, teacher, split, in_chans, num_classes, shapes, options)

    def load_teacher_weights(self, path: Path) -> None:
        from .runs import load_tensors

        state = load_tensors(path)
        try:
            self.teacher.load_state_dict(state)
        except RuntimeError as err:
            raise EtaError(f"teacher checkpoint {path} does not match {self.space.teacher.model}: {str(err).splitlines()[0]}") from None
        self.teacher.eval()

    # --- encodings ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.options)

    @property
    def options_per_block(self) -> list[int]:
        return [len(o) for o in self.options]

    def arch(self, choices) -> tuple:
        return tuple(self.options[b][int(c)] for b, c in enumerate(choices))

    def choices(self, arch) -> tuple:
        try:
            return tuple(self.options[b].index(op) for b, op in enumerate(arch))
        except ValueError:
            raise EtaError(f"architecture {arch_to_str(arch)} is not in this search space") from None

    def teacher_choices(self) -> tuple:
        t = OpSpec("teacher")
        if not all(t in opts for opts in self.options):
            return None
        return tuple(opts.index(t) for opts in self.options)

    def space_size(self) -> int:
        return int(np.prod([len(o) for o in self.options], dtype=np.float64))

    def trainable_specs(self, block: int) -> list[OpSpec]:
        """Float operators of a block that phase 1 must pretrain (identity and teacher need none)."""
        seen = []
        for s in self.options[block]:
            f = s.with_bits(32)
            if f.family not in ("identity", "teacher") and f not in seen:
                seen.append(f)
        return seen

    def input_shape(self, resolution: int | None = None, batch: int = 1) -> tuple:
        r = resolution or self.space.data.resolution
        return (batch, self.in_chans, r, r)


def bind(space: SearchSpace, splits) -> BoundSpace:
    return BoundSpace.build(space, in_chans=splits.in_chans, num_classes=splits.num_classes)


def set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def splits_for(space: SearchSpace):
    """The data splits a search space names (train without the proxy set, proxy, test)."""
    from .data import load_splits

    d = space.data
    return load_splits(
        d.dataset, root=d.root, proxy_fraction=d.proxy_fraction, seed=space.seed, download=d.download,
        max_train=d.max_train, max_test=d.max_test,
    )


def bound_with_teacher(space: SearchSpace, splits, teacher_state: dict | None) -> BoundSpace:
    bound = bind(space, splits)
    if teacher_state is not None:
        bound.teacher.load_state_dict(teacher_state)
        bound.teacher.eval()
    return bound
