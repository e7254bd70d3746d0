"""Operator families: a registry, one entry per family, and the built-in ones.

A family (:class:`Family`) knows how its operators are named in architecture strings, where they
fit, how they are built, how their hidden channels are sliced into narrower operators, and
whether they have an integer lowering. ``register`` adds one; ``get(name)`` finds it. Built in:
``ir``, ``fused``, ``basic``, ``bottleneck`` (:mod:`.conv`), ``vit`` (:mod:`.vit`), ``identity``
(:mod:`.identity`) and ``teacher`` (:mod:`.teacher`).
"""
from .base import BlockSlot, Family
from .registry import added_outside, build_operator, canonical, families, get, names, register, unregister

from . import conv, identity, teacher, vit  # noqa: E402,F401  (built-in families register on import)

__all__ = ["BlockSlot", "Family", "added_outside", "build_operator", "canonical", "families", "get", "names", "register", "unregister"]
