"""The registry of operator families, by name (as timm registers its models)."""
from __future__ import annotations

from ..errors import EtaError
from .base import BlockSlot, Family

_FAMILIES: dict[str, Family] = {}
_NAMES: dict[str, str] = {}  # name, token or alias -> name


def register(family: Family | type[Family]) -> Family | type[Family]:
    """Add a family (an instance, or a class instantiated without arguments); usable as a class decorator."""
    instance = family() if isinstance(family, type) else family
    if not instance.name or not instance.name.isidentifier() or not instance.name.islower():
        raise EtaError(f"operator family name {instance.name!r} must be a lower-case identifier")
    for key in (instance.name, instance.prefix, *instance.aliases):
        owner = _NAMES.get(key)
        if owner is not None and owner != instance.name:
            raise EtaError(f"operator family {instance.name!r}: the name {key!r} is taken by family {owner!r}")
    _FAMILIES[instance.name] = instance
    for key in (instance.name, instance.prefix, *instance.aliases):
        _NAMES[key] = instance.name
    return family


def unregister(name: str) -> None:
    family = _FAMILIES.pop(name, None)
    for key in [k for k, v in _NAMES.items() if v == name]:
        del _NAMES[key]
    if family is None:
        raise EtaError(f"no operator family {name!r} to unregister")


def get(name: str) -> Family:
    """The family of a YAML name, token or alias; one line naming the known ones otherwise."""
    try:
        return _FAMILIES[_NAMES[name]]
    except KeyError:
        raise EtaError(f"unknown operator family '{name}' (known: {', '.join(names())})") from None


def canonical(name: str) -> str:
    return get(name).name


def names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def added_outside(package: str) -> list[Family]:
    """Families whose class was defined outside ``package`` (a user's or a test's): Ray workers need them too."""
    return [f for f in _FAMILIES.values() if not type(f).__module__.startswith(package + ".")]


def build_operator(spec, in_shape: tuple, out_shape: tuple, teacher_block=None):
    """A standalone operator from shapes (and the teacher's block, for ``teacher``): ``get(family).build`` on a slot."""
    return get(spec.family).build(spec, BlockSlot(tuple(in_shape), tuple(out_shape), teacher_block))
