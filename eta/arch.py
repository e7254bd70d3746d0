"""Operator choices and architectures, and their short readable strings.

An architecture is one :class:`OpSpec` per replaceable teacher block. Strings follow timm's
habit of one token per block: ``ir_k3_e6`` (inverted residual, kernel 3, expansion 6),
``basic_k3_e0.5``, ``vit_h4_e2``, ``id`` (identity), ``teacher`` (the teacher's own block), with
``_w8`` when the block runs at 8 bits and ``_x0.5`` when the student keeps half of the teacher's
channels between blocks (its interface width). A whole architecture joins the block tokens with ``-``.
Which fields a token carries is its family's business (:mod:`eta.families`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from . import families
from .errors import EtaError

_TOKEN = re.compile(r"^(?P<fam>[a-z][a-z0-9]*)(?:_k(?P<k>\d+))?(?:_h(?P<h>\d+))?(?:_e(?P<e>[0-9.]+))?(?:_x(?P<x>[0-9.]+))?"
                    r"(?:_w(?P<w>\d+))?$")
_FIELD_TAG = {"kernel": "k", "heads": "h", "expansion": "e"}


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True, order=True)
class OpSpec:
    """One candidate operator for one block.

    ``expansion`` is the elastic width: hidden channels over the reference channel count of the
    family (input channels for ``ir``/``fused``, output channels for ``basic``/``bottleneck``,
    embedding size for ``vit``). ``heads`` is used by ``vit`` only. ``bits`` is the weight and
    activation bit-width the block runs at (32 = float). ``width`` is the student's interface width:
    the fraction of the teacher's channels kept between blocks (the same in every block of one
    student, :mod:`eta.interfaces`). ``family`` is a registered family's name.
    """

    family: str
    kernel: int = 0
    expansion: float = 0.0
    heads: int = 0
    bits: int = 32
    width: float = 1.0

    def __post_init__(self):
        fam = families.get(self.family)  # one line naming the known families otherwise
        object.__setattr__(self, "family", fam.name)
        for name, value in fam.defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, type(getattr(self, name))(value))
        object.__setattr__(self, "width", float(self.width))
        if not 0 < self.width <= 1:
            raise EtaError(f"operator {self.family}: interface width {self.width:g} must be in (0, 1]")

    @property
    def super_key(self) -> str:
        """Which elastic super-operator this spec is a slice of (same family and kernel/heads)."""
        return families.get(self.family).super_key(self)

    def with_bits(self, bits: int) -> "OpSpec":
        return replace(self, bits=bits)

    def with_width(self, width: float) -> "OpSpec":
        return replace(self, width=float(width))

    def __str__(self) -> str:
        fam = families.get(self.family)
        parts = [fam.prefix]
        for f in fam.fields:
            value = getattr(self, f)
            if fam.defaults.get(f) != value:
                parts.append(f"{_FIELD_TAG[f]}{_fmt_num(value)}")
        if self.width != 1:
            parts.append(f"x{_fmt_num(self.width)}")
        s = "_".join(parts)
        return s if self.bits == 32 else f"{s}_w{self.bits}"

    @classmethod
    def parse(cls, token: str) -> "OpSpec":
        m = _TOKEN.match(token.strip())
        if not m:
            raise EtaError(f"cannot parse operator '{token}' (expected e.g. ir_k3_e6, basic_k3_e0.5, id, teacher)")
        return cls(m["fam"], kernel=int(m["k"] or 0), expansion=float(m["e"] or 0.0), heads=int(m["h"] or 0),
                   bits=int(m["w"] or 32), width=float(m["x"] or 1.0))


Architecture = tuple  # tuple[OpSpec, ...], one per replaceable block


def arch_to_str(arch) -> str:
    return "-".join(str(op) for op in arch)


def arch_from_str(s: str) -> tuple:
    return tuple(OpSpec.parse(t) for t in s.split("-") if t)


def arch_width(arch) -> float:
    """The interface width of a student (one for all its blocks)."""
    widths = {float(op.width) for op in arch}
    if len(widths) != 1:
        raise EtaError(f"architecture {arch_to_str(arch)} mixes interface widths {sorted(widths)}: one student keeps one")
    return widths.pop()
