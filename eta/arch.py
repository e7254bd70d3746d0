"""Operator choices and architectures, and their short readable strings.

An architecture is one :class:`OpSpec` per replaceable teacher block. Strings follow timm's
habit of one token per block: ``ir_k3_e6`` (inverted residual, kernel 3, expansion 6),
``basic_k3_e0.5``, ``id`` (identity), ``teacher`` (the teacher's own block), with ``_w8`` when
the block runs at 8 bits. A whole architecture joins the block tokens with ``-``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import EtaError

FAMILIES = ("ir", "fused", "basic", "bottleneck", "vit", "identity", "teacher")
_TOKEN = re.compile(r"^(?P<fam>[a-z]+)(?:_k(?P<k>\d+))?(?:_h(?P<h>\d+))?(?:_e(?P<e>[0-9.]+))?(?:_w(?P<w>\d+))?$")


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True, order=True)
class OpSpec:
    """One candidate operator for one block.

    ``expansion`` is the elastic width: hidden channels over the reference channel count of the
    family (input channels for ``ir``/``fused``, output channels for ``basic``/``bottleneck``,
    embedding size for ``vit``). ``heads`` is used by ``vit`` only. ``bits`` is the weight and
    activation bit-width the block runs at (32 = float).
    """

    family: str
    kernel: int = 0
    expansion: float = 0.0
    heads: int = 0
    bits: int = 32

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise EtaError(f"unknown operator family '{self.family}' (known: {', '.join(FAMILIES)})")

    @property
    def is_parameter_free(self) -> bool:
        return self.family == "identity"

    @property
    def super_key(self) -> str:
        """Which elastic super-operator this spec is a slice of (same family and kernel/heads)."""
        if self.family in ("identity", "teacher"):
            return self.family
        if self.family == "vit":
            return f"vit_h{self.heads}"
        return f"{self.family}_k{self.kernel}"

    def with_bits(self, bits: int) -> "OpSpec":
        return replace(self, bits=bits)

    def __str__(self) -> str:
        if self.family == "identity":
            s = "id"
        elif self.family == "teacher":
            s = "teacher"
        elif self.family == "vit":
            s = f"vit_h{self.heads}_e{_fmt_num(self.expansion)}"
        else:
            s = f"{self.family}_k{self.kernel}_e{_fmt_num(self.expansion)}"
        return s if self.bits == 32 else f"{s}_w{self.bits}"

    @classmethod
    def parse(cls, token: str) -> "OpSpec":
        token = token.strip()
        if token.startswith("id"):
            bits = int(token.split("_w")[1]) if "_w" in token else 32
            return cls("identity", bits=bits)
        m = _TOKEN.match(token)
        if not m:
            raise EtaError(f"cannot parse operator '{token}' (expected e.g. ir_k3_e6, basic_k3_e0.5, id, teacher)")
        fam = m["fam"]
        return cls(
            fam,
            kernel=int(m["k"] or 0),
            expansion=float(m["e"] or 0.0),
            heads=int(m["h"] or 0),
            bits=int(m["w"] or 32),
        )


Architecture = tuple  # tuple[OpSpec, ...], one per replaceable block


def arch_to_str(arch) -> str:
    return "-".join(str(op) for op in arch)


def arch_from_str(s: str) -> tuple:
    return tuple(OpSpec.parse(t) for t in s.split("-") if t)
