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

from . import families
from .arch import OpSpec, arch_to_str
from .data import load_splits, split_options
from .errors import EtaError
from .files import load_tensors
from .families import BlockSlot
from .interfaces import ThinnedTeacher, describe_interfaces, thin
from .network import StemBlocksHead
from .space import SearchSpace, parse_space
from .teachers import block_io_shapes, build_teacher, split_teacher

log = logging.getLogger(__name__)


def module_digest(module: nn.Module) -> str:
    """A short hash of a module's structure (not its weights): latency depends on structure only."""
    return hashlib.sha1(repr(module).encode()).hexdigest()[:12]


@dataclass
class BoundSpace:
    space: SearchSpace
    teacher: nn.Module
    split: StemBlocksHead
    in_chans: int
    num_classes: int
    shapes: list  # per block (in_shape, out_shape) at data.resolution, batch-free
    options: list  # per block: list[OpSpec], fixed order
    thinned: dict  # interface width -> ThinnedTeacher (1.0: the teacher itself)
    thinned_shapes: dict  # interface width -> per block (in_shape, out_shape)
    interfaces: tuple = ()  # the teacher's interface groups, when a width below 1 is asked

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
        input_shape = (in_chans, res, res)
        interfaces = describe_interfaces(split, input_shape) if any(w < 1 for w in space.widths) else ()
        if interfaces:
            log.info("interface widths %s: %d coupled channel groups (%s)", ", ".join(f"{w:g}" for w in space.widths), len(interfaces),
                     "; ".join(f"{i.group.full} channels at boundaries {list(i.boundaries)}" for i in interfaces))
        bound = cls(space, teacher, split, in_chans, num_classes, [], [], {}, {}, interfaces)
        bound.rethin()
        shapes_at = {w: [(tuple(i), tuple(o)) for i, o in block_io_shapes(t.split, input_shape)] for w, t in bound.thinned.items()}
        bound.shapes, bound.thinned_shapes = shapes_at[1.0], shapes_at
        specs = space.op_specs()
        for b, (ins, outs) in enumerate(bound.shapes):
            opts = [s for s in specs if families.get(s.family).fits(s, bound.slot(b, s.width))]
            if not opts:
                raise EtaError(f"block {b} ({split.block_names[b]}, {ins}->{outs}): no operator of the pool fits; add 'teacher' or a matching family")
            bound.options.append(opts)
        unfit = {s.family for s in specs} - {s.family for opts in bound.options for s in opts}
        for fam in sorted(unfit):
            log.warning("operator family '%s' fits no block of this teacher and is ignored", fam)
        for w in space.widths:
            if not all(any(s.width == w for s in opts) for opts in bound.options):
                raise EtaError(f"interface width {w:g}: some block has no operator of the pool at that width; add 'teacher' to the pool")
        return bound

    def load_teacher_weights(self, path: Path) -> None:
        state = load_tensors(path)
        try:
            self.teacher.load_state_dict(state)
        except RuntimeError as err:
            raise EtaError(f"teacher checkpoint {path} does not match {self.space.teacher.model}: {str(err).splitlines()[0]}") from None
        self.teacher.eval()
        self.rethin()

    def rethin(self) -> None:
        """Thin the teacher again at every narrower interface width: which channels are kept follows its weights,
        so this runs whenever they change (loaded, trained)."""
        self.thinned = {1.0: ThinnedTeacher(1.0, self.split, None)}
        self.thinned.update({w: thin(self.split, self.interfaces, w) for w in self.space.widths if w < 1})

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
        return int(sum(np.prod([len(k) for k in keep], dtype=np.float64) for _, keep in self.partitions()))

    def slot(self, block: int, width: float = 1.0) -> BlockSlot:
        """Where block ``block`` sits at an interface width: its shapes and the (thinned) teacher's module (shared, not copied)."""
        ins, outs = self.thinned_shapes[float(width)][block]
        return BlockSlot(ins, outs, self.thinned[float(width)].split.blocks[block], block, self.split.block_names[block])

    def operator(self, block: int, spec: OpSpec) -> nn.Module:
        """A standalone float operator for ``block`` with fresh weights (the teacher's own block: a copy)."""
        return families.get(spec.family).build(spec.with_bits(32), self.slot(block, spec.width))

    # --- interface widths ---------------------------------------------------------------------
    @property
    def widths(self) -> list[float]:
        return list(self.space.widths)

    def stem(self, width: float = 1.0) -> nn.Module:
        """The teacher's stem keeping ``width`` of its output channels (a slice: exact on the kept channels)."""
        return self.thinned[float(width)].split.stem

    def head(self, width: float = 1.0) -> nn.Module:
        """The teacher's head reading ``width`` of its input channels (sliced; phase 1 distils it again)."""
        return self.thinned[float(width)].split.head

    def kept_channels(self, width: float):
        """Per boundary (block inputs, then the head's input), the teacher's channels kept at ``width``; None at 1."""
        return self.thinned[float(width)].kept

    def partitions(self) -> list[tuple[float, list[list[int]]]]:
        """Per interface width, each block's option indices at that width: a student takes all its blocks from one."""
        return [(w, [[j for j, s in enumerate(opts) if s.width == w] for opts in self.options]) for w in self.widths]

    def width_of(self, choices) -> float:
        """The interface width of a student (all its blocks share one)."""
        return float(self.options[0][int(choices[0])].width)

    def uniform_teacher_choices(self) -> list[tuple]:
        """The teacher's own block, at one hidden width and one interface width in every block, for each such
        pair the space offers but the teacher itself: the uniformly thinned teachers a user would try first."""
        teacher, out = self.teacher_choices(), []
        for spec in self.options[0]:
            if spec.family != "teacher" or spec.bits != 32 or not all(spec in opts for opts in self.options):
                continue
            choice = tuple(opts.index(spec) for opts in self.options)
            if choice != teacher:
                out.append(choice)
        return out

    def random_choices(self, rng: np.random.Generator) -> tuple:
        """A uniformly drawn student: an interface width (when there are several), then one of its operators per block."""
        parts = self.partitions()
        _, keep = parts[int(rng.integers(len(parts)))] if len(parts) > 1 else parts[0]
        return tuple(int(k[rng.integers(len(k))]) for k in keep)

    def trainable_specs(self, block: int) -> list[OpSpec]:
        """Float operators of a block that phase 1 must pretrain (identity and the teacher's own block need none), all widths."""
        seen = []
        for s in self.options[block]:
            f = s.with_bits(32)
            if families.get(f.family).is_trainable(f) and f not in seen:
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
    return load_splits(space.data.dataset, **split_options(space))


def bound_with_teacher(space: SearchSpace, splits, teacher_state: dict | None) -> BoundSpace:
    bound = bind(space, splits)
    if teacher_state is not None:
        bound.teacher.load_state_dict(teacher_state)
        bound.teacher.eval()
        bound.rethin()
    return bound


def rebuild(space_dict: dict, teacher_state: dict | None):
    """(bound space, data splits) from plain data: what a Ray task on any node starts from."""
    space = parse_space(space_dict)
    splits = splits_for(space)
    return bound_with_teacher(space, splits, teacher_state), splits
