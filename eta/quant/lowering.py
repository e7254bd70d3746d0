"""How a block operator is read as an integer program, and the registry of module types that can be.

A block is described as a short program of :class:`Step` s. Each step sums one or more terms (a
conv of a quantized tensor, or a quantized tensor itself for an identity shortcut), applies ReLU /
ReLU6 / nothing and requantizes the result to its own scale with one rounding. A residual add is
therefore a step with two terms rescaled to a common fixed-point scale, and ResNet's final ReLU is
the clamp of that step.

Which module classes have such a description is not quantization's knowledge but the operator
families': each family registers a describer for the classes it builds or recognises
(:func:`register_lowering`), and :func:`describe` finds it by the module's class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from timm.layers import BatchNormAct2d
from torch import nn

from ..errors import EtaError

INPUT = "x"
OUTPUT = "out"
ACTIVATIONS = ("none", "relu", "relu6")


@dataclass(frozen=True)
class Term:
    """One summand of a step: ``conv`` applied to tensor ``src``, or ``src`` itself when ``conv`` is None."""

    src: str
    conv: str | None = None


@dataclass(frozen=True)
class Step:
    """``dst = requantize(act(sum of terms))``; the last step of a block writes ``out``."""

    dst: str
    terms: tuple[Term, ...]
    act: str = "none"


# (family name, {conv name: (conv, norm)}, steps)
Description = tuple[str, dict, tuple[Step, ...]]
Describer = Callable[[nn.Module], Description]

_DESCRIBERS: dict[type, Describer] = {}
_NOT_LOWERABLE: dict[type, str] = {}


def register_lowering(*module_types: type) -> Callable[[Describer], Describer]:
    """Decorator: ``fn(module) -> (family, convs, steps)`` describes modules of these classes."""
    def wrap(fn: Describer) -> Describer:
        for t in module_types:
            _DESCRIBERS[t] = fn
        return fn

    return wrap


def register_no_lowering(module_type: type, reason: str) -> None:
    """Say why modules of a class have no integer program (the error a user sees)."""
    _NOT_LOWERABLE[module_type] = reason


def describe(module: nn.Module) -> Description:
    """(family, {conv name: (conv, norm)}, steps) of a block operator some family has registered."""
    for cls in type(module).__mro__:
        if cls in _DESCRIBERS:
            return _DESCRIBERS[cls](module)
        if cls in _NOT_LOWERABLE:
            raise EtaError(_NOT_LOWERABLE[cls])
    raise EtaError(f"{_qualified(type(module))} has no integer lowering (registered: "
                   f"{', '.join(sorted({_qualified(t) for t in _DESCRIBERS}))})")


def _qualified(cls: type) -> str:
    """``module.Class``: two libraries' ``BasicBlock`` s are different classes to the registry."""
    return f"{cls.__module__}.{cls.__qualname__}"


def lowerable(module: nn.Module) -> bool:
    try:
        describe(module)
    except EtaError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# helpers for describers


def activation_kind(module: nn.Module | None) -> str:
    if module is None or isinstance(module, nn.Identity):
        return "none"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.ReLU):
        return "relu"
    raise EtaError(f"activation {type(module).__name__} has no integer lowering (use ReLU or ReLU6)")


def norm_activation(bn: nn.Module, act: nn.Module | None = None) -> str:
    """The activation after a norm: timm's BatchNormAct2d carries it, plain BatchNorm2d is followed by ``act``."""
    kinds = [activation_kind(act)]
    if isinstance(bn, BatchNormAct2d):
        if not isinstance(bn.drop, nn.Identity):
            raise EtaError("BatchNormAct2d with drop-block has no integer lowering")
        kinds.append(activation_kind(bn.act))
    elif not isinstance(bn, nn.BatchNorm2d):
        raise EtaError(f"norm layer {type(bn).__name__} cannot be folded into a conv (use BatchNorm2d)")
    active = [k for k in kinds if k != "none"]
    if len(active) > 1:
        raise EtaError("two activations in a row have no integer lowering")
    return active[0] if active else "none"


def require_absent_or_identity(module: nn.Module, *names: str) -> None:
    for name in names:
        sub = getattr(module, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise EtaError(f"{type(module).__name__}.{name} ({type(sub).__name__}) has no integer lowering")


def projection_shortcut(module: nn.Module, convs: dict) -> Term:
    """The residual term of a ResNet block: the input itself, or its ``downsample`` (conv, BatchNorm2d)."""
    if module.downsample is None:
        return Term(INPUT)
    ds = module.downsample
    if not (isinstance(ds, nn.Sequential) and len(ds) == 2):
        raise EtaError(f"{type(module).__name__}.downsample must be Sequential(conv, BatchNorm2d)")
    convs["downsample"] = (ds[0], ds[1])
    return Term(INPUT, "downsample")
