"""The one shape of network eta works with: a stem, a chain of replaceable blocks, a head.

A teacher is cut into this shape (:mod:`eta.teachers`), students are assembled in it
(:mod:`eta.student`), and the teachers eta trains itself are written in it (:mod:`eta.zoo`), so a
state dict moves between them by its ``stem.`` / ``blocks.<i>.`` / ``head.`` keys.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn


class StemBlocksHead(nn.Module):
    """Runs ``stem``, then each of ``blocks``, then ``head``; ``block_names`` are the blocks' paths in
    the model they came from (``blocks.<i>`` when it was built this way)."""

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, block_names: Sequence[str] | None = None):
        super().__init__()
        blocks = list(blocks)
        names = [f"blocks.{i}" for i in range(len(blocks))] if block_names is None else [str(n) for n in block_names]
        if len(names) != len(blocks):
            raise ValueError(f"{len(blocks)} blocks but {len(names)} names")
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.block_names = names

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
