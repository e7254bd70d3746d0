"""What phases hand each other through the run directory, as typed records.

Each record is a dataclass with ``to_dict`` / ``from_dict``; ``from_dict`` fills fields that older
runs did not write with what those runs meant, and keeps fields it does not know in ``extra``, so
files of other eta versions round-trip.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T", bound="Record")


@dataclass
class Record:
    extra: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra", {}) or {}
        return {**d, **extra}

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls) if f.name in known and f.name not in data
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise KeyError(", ".join(missing))
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})


@dataclass
class LatencyInfo(Record):
    """``latency/latency.json``: the option latencies the solver uses, their calibration, the teacher's latency."""

    backend: str = "tvm"
    target: dict = field(default_factory=dict)
    device: str = ""
    table: str = ""
    base_ms: float = 0.0
    option_ms: list = field(default_factory=list)  # per block, per option (uncalibrated table figures)
    options: list = field(default_factory=list)  # per block, the option tokens in the same order
    calibration: dict = field(default_factory=lambda: {"kind": "ratio", "a": 1.0, "b": 0.0})
    teacher_ms: dict = field(default_factory=dict)  # resolution (str) -> measured ms
    schedule: str = "untuned"  # runs before the schedule policy was recorded were untuned
    io: dict | None = None  # {"in_chans", "num_classes"} of the data (None in early runs)

    def teacher_latency(self, resolution: int) -> float:
        return float(self.teacher_ms[str(resolution)])


@dataclass
class SolutionRow(Record):
    """One row of ``solve/solutions.json``: a solution of one budget."""

    budget_ms: float = 0.0
    rank: int = 0
    arch: str = ""
    choices: list = field(default_factory=list)
    predicted_acc: float = 0.0
    proxy_acc: float = 0.0
    predicted_latency_ms: float = 0.0
    solver_s: float = 0.0
    method: str = ""


@dataclass
class FrontPoint(Record):
    """A finetuned student at one resolution, as ``pareto.json`` lists it."""

    id: str = ""
    arch: str = ""
    resolution: int = 0
    latency_ms: float = 0.0
    test_acc: float = 0.0
    bits: list = field(default_factory=list)
    predicted_latency_ms: float | None = None
    params: int = 0
    size_mb: float = 0.0
    bops_g: float = 0.0
    weights: str = ""  # relative to the run directory


@dataclass
class Front(Record):
    """``pareto.json``: every measured student point, the front among them, the teacher's points."""

    run: str = ""
    device: str = ""
    backend: str = ""
    target: Any = None
    teacher: dict = field(default_factory=dict)  # {"model", "points": [{resolution, latency_ms, test_acc}]}
    front: list = field(default_factory=list)  # FrontPoint dicts
    all: list = field(default_factory=list)
    finetune_s: float = 0.0

    def points(self, front_only: bool = True) -> list[FrontPoint]:
        return [FrontPoint.from_dict(p) for p in (self.front if front_only else self.all)]
