"""Search spaces: YAML on disk, validated into typed settings on load.

A space names the teacher, the data, the operator pool, bit-widths, resolutions, the latency
target, the budgets and the settings of each phase. Everything a run does is decided here, so
the frozen copy in ``runs/<name>/space.yaml`` is enough to reproduce it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import families
from .arch import OpSpec
from .errors import EtaError


# section names of spaces written before each phase had one name (still read)
LEGACY_SECTIONS = {"phase1": "pretrain", "phase2": "solve", "phase3": "finetune"}
# a run name (the space's name or --name) is one plain folder name: no separators, no '..'
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _each(values: list, ok, message: str) -> list:
    """``values`` unchanged when ``ok`` holds for each; else the error ``message`` names the first that fails."""
    for x in values:
        if not ok(x):
            raise ValueError(message.format(x))
    return values

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherTraining(_Strict):
    """How eta trains a teacher itself (``eta teacher train``); ignored when a checkpoint is given."""

    epochs: int = Field(20, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision: auto = bf16/fp16 on CUDA, off on CPU")


class TeacherConfig(_Strict):
    model: str = Field(..., description="timm model name, or 'package.module:callable'")
    kwargs: dict = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="trained weights; null = train and cache in the run")
    pretrained: bool = Field(False, description="timm teachers: start from timm's pretrained weights (downloaded once) instead of training")
    blocks: Union[Literal["auto"], list[str]] = "auto"
    train: TeacherTraining = Field(default_factory=TeacherTraining)


class DataConfig(_Strict):
    class Augment(_Strict):
        """A preset with some fields changed (``eta.augment`` says what each preset means per data set)."""

        preset: Literal["auto", "none", "light", "standard", "strong"] = "auto"
        crop: Optional[Literal["none", "shift", "resized"]] = Field(None, description="shift: pad-and-crop; resized: random-resized crop")
        shift: Optional[float] = Field(None, ge=0, lt=0.5, description="largest shift, as a fraction of the side")
        scale: Optional[tuple[float, float]] = Field(None, description="random-resized crop: range of the area kept")
        ratio: Optional[tuple[float, float]] = Field(None, description="random-resized crop: range of aspect ratios")
        hflip: Optional[float] = Field(None, ge=0, le=1, description="probability of a horizontal flip (0 for digits)")
        rand_augment: Optional[str] = Field(None, description="timm RandAugment, e.g. 'rand-m9-mstd0.5'")
        color_jitter: Optional[float] = Field(None, ge=0)
        mixup: Optional[float] = Field(None, ge=0, description="mixup alpha (timm Mixup); 0 = off")
        cutmix: Optional[float] = Field(None, ge=0, description="cutmix alpha; 0 = off")
        label_smoothing: Optional[float] = Field(None, ge=0, lt=1)
        pretrain: Optional[bool] = Field(None, description="also augment the pretrain phase's distillation batches")

    dataset: str
    root: Optional[str] = None
    download: bool = False
    resolution: int = Field(..., ge=4, description="input size of the teacher, phases 1 and 2")
    proxy_fraction: float = Field(0.05, gt=0, lt=0.5)
    max_train: Optional[int] = Field(None, ge=10)
    max_test: Optional[int] = Field(None, ge=10)
    batch_size: int = Field(64, ge=1)
    decode_size: Optional[int] = Field(None, ge=4, description="image folders: decode size; null = the largest resolution used")
    cache: Literal["auto", "memory", "disk", "none"] = Field("auto", description="image folders: keep the decoded uint8 images "
                                                             "in memory, memory-mapped from the cache, or read lazily; "
                                                             "auto: memory when they fit cache_max_gb")
    cache_max_gb: float = Field(4.0, gt=0, description="cache auto: the largest decoded set kept in memory")
    workers: Optional[int] = Field(None, ge=0, description="DataLoader workers for lazily read sets; null = min(4, CPUs)")
    augment: Union[Literal["auto", "none", "light", "standard", "strong"], Augment] = Field(
        "auto", description="training augmentation: a preset or {preset: ..., field: value}; auto: light for digits and "
                            "fashion_mnist, standard for cifar10 and image folders")


class PoolEntry(_Strict):
    """One operator family with the kernels, elastic widths and head counts to try (those its family uses)."""

    family: str
    kernel: list[int] = Field(default_factory=lambda: [3])
    expansion: list[float] = Field(default_factory=lambda: [1.0])
    heads: list[int] = Field(default_factory=lambda: [0])

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        try:
            return families.canonical(v)
        except EtaError as err:
            raise ValueError(str(err)) from None

    @field_validator("kernel", "expansion", "heads", mode="before")
    @classmethod
    def _listify(cls, v):
        return v if isinstance(v, list) else [v]

    @field_validator("kernel")
    @classmethod
    def _odd_kernels(cls, v: list[int]) -> list[int]:
        return _each(v, lambda k: k >= 1 and k % 2 == 1,
                     "kernel size {}: kernels are odd and positive (padding k//2 keeps the feature map's size)")

    @field_validator("expansion")
    @classmethod
    def _positive_expansions(cls, v: list[float]) -> list[float]:
        return _each(v, lambda e: e > 0, "expansion {}: an elastic width is a positive multiple of the reference channels")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[int]) -> list[int]:
        return _each(v, lambda h: h >= 0, "heads {}: a number of attention heads is at least 1 (0: not a transformer family)")

    def specs(self) -> list[OpSpec]:
        """Every combination of the settings the family varies (the others are ignored)."""
        fields = families.get(self.family).fields
        values = {"kernel": self.kernel, "expansion": self.expansion, "heads": self.heads}
        return [OpSpec(self.family, **dict(zip(fields, combo))) for combo in itertools.product(*(values[f] for f in fields))]


_BUDGET_MS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*ms\s*$")


class Budget(BaseModel):
    """A latency budget: a fraction of the teacher's measured latency, or absolute milliseconds."""

    value: float
    absolute_ms: bool

    @classmethod
    def parse(cls, raw) -> "Budget":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if not 0 < raw <= 1.5:
                raise EtaError(f"budget {raw}: a bare number is a fraction of the teacher's latency (0 < f <= 1.5); write '{raw}ms' for milliseconds")
            return cls(value=float(raw), absolute_ms=False)
        m = _BUDGET_MS.match(str(raw))
        if m:
            return cls(value=float(m.group(1)), absolute_ms=True)
        try:
            return cls.parse(float(str(raw)))
        except ValueError:
            raise EtaError(f"budget '{raw}': expected a fraction such as 0.6 or milliseconds such as '2.5ms'") from None

    def to_ms(self, teacher_ms: float) -> float:
        return self.value if self.absolute_ms else self.value * teacher_ms

    def __str__(self) -> str:
        return f"{self.value:g}ms" if self.absolute_ms else f"{self.value:g}x"


class TuneConfig(_Strict):
    """MetaSchedule's budget for a space's tasks not tuned yet (one database per target, shared by every space)."""

    trials_per_task: int = Field(8, ge=1, description="the budget: this many trials per task to tune, allocated by the "
                                 "gradient rule (tasks that matter more get more)")
    total_trials: Optional[int] = Field(None, ge=1, description="the whole budget instead, whatever the number of tasks")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop tuning after this long (what was found is kept)")
    deepen: bool = Field(False, description="also tune tasks that have schedules already (other spaces, shipped ones) "
                                            "until each has had trials_per_task trials")
    population: int = Field(128, ge=8, description="evolutionary search's population per batch (512 is TVM's default)")
    nodes: Optional[str] = Field(None, description="tune on every Ray node holding this custom resource (machines like the "
                                 "measuring one), each a share of the tasks and budget; their records are merged into the "
                                 "database the table compiles with")


class LatencyConfig(_Strict):
    backend: Literal["tvm", "torch"] = "tvm"
    target: str = Field("llvm", description="TVM target kind: llvm (host CPU) or cuda")
    batch_size: int = Field(1, ge=1)
    number: Optional[int] = Field(None, ge=1, description="runs averaged per timing; None = automatic")
    repeat: int = Field(7, ge=3)
    max_spread: float = Field(0.05, gt=0, description="re-measure entries whose relative spread is wider")
    max_slowdown: Optional[float] = Field(1.25, ge=1.0, description="CPU timings wait (up to settle_s) while a reference loop "
                                          "runs more than this many times slower than its fastest here; null: never wait")
    settle_s: float = Field(3.0, ge=0, description="how long one timing waits for the machine's usual speed")
    schedules: Optional[Literal["tuned", "untuned"]] = Field(
        None, description="tvm: compile with MetaSchedule-tuned schedules (tuned first, under latency.tune's budget) or TVM's "
                          "untuned defaults; null: tuned (integer kernels of bits below 32 too)")
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tune_trials: int = Field(0, ge=0, description="spaces of earlier eta: > 0 means tuned, this many trials per task")
    torch_compile: bool = Field(False, description="torch backend: time torch.compile'd modules instead of eager ones")
    calibration_students: int = Field(6, ge=0, description="random whole students compiled to fit latency ≈ a·Σtable + b")
    node_resource: Optional[str] = Field(None, description="Ray custom resource of the node that measures, e.g. latency:rpi4")
    drift_tolerance: Optional[float] = Field(0.10, gt=0, description="re-measure the whole table when cached entries time "
                                             "this much off here (another machine); null: trust the table")

    @model_validator(mode="after")
    def _one_place_for_schedules(self):
        if self.tune.nodes and self.node_resource:
            raise ValueError("tune.nodes and node_resource together: tuning on several nodes merges into the database "
                             "of the machine that measures, so measure on the driver's machine (drop node_resource)")
        return self

    @property
    def tuned(self) -> bool:
        """TVM with tuned schedules: unless ``schedules: untuned`` says otherwise, float and integer kernels alike."""
        return self.backend == "tvm" and self.schedules != "untuned"

    @property
    def trials_per_task(self) -> int:
        return self.tune_trials or self.tune.trials_per_task

    @field_validator("target")
    @classmethod
    def _target_kind(cls, v: str, info: ValidationInfo) -> str:
        kinds = {"tvm": ("llvm", "cuda"), "torch": ("cpu", "cuda", "llvm")}.get(info.data.get("backend"), ())
        if kinds and v not in kinds:
            raise ValueError(f"target '{v}' is not one of the {info.data['backend']} backend's: {', '.join(kinds[:2])}")
        return v


class PretrainConfig(_Strict):
    """Phase 1 (``pretrain``): block-wise distillation of every candidate operator."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    elastic: bool = True
    sort_every: int = Field(100, ge=1, description="re-rank hidden channels every N steps")
    num_cpus: float = Field(1, gt=0, description="CPUs per Ray task")
    num_gpus: float = Field(0, ge=0, description="GPUs (or fractions) per Ray task")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on CUDA (auto: bf16 where supported)")
    tasks: Optional[int] = Field(None, ge=1, description="number of block groups; None = one per available CPU slot")


class PredictorConfig(_Strict):
    encoding: Literal["one_hot", "index"] = "one_hot"
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=2)
    activation: Literal["tanh", "relu"] = "tanh"
    output: Literal["linear", "sigmoid"] = Field("sigmoid", description="sigmoid: fit logit(accuracy), so predictions stay in (0, 1)")
    optimizer: Literal["adam", "sgd"] = "adam"
    epochs: int = Field(300, ge=1)
    lr: float = Field(3e-3, gt=0)


class SolveConfig(_Strict):
    """Phase 2 (``solve``): proxy accuracy of sampled students, the accuracy predictor, the INLP per budget."""

    samples: int = Field(300, ge=10, description="stitched students evaluated on the proxy set")
    sample_levels: int = Field(10, ge=1, description="latency levels the samples are spread over (the 'Multi' setting)")
    holdout: float = Field(0.2, gt=0, lt=0.9, description="fraction of samples kept to measure the predictor's Spearman")
    bn_batches: int = Field(4, ge=1, description="training batches used to recalibrate BatchNorm statistics")
    eval_tasks: Optional[int] = Field(None, ge=1)
    num_gpus: float = Field(0, ge=0, description="GPUs (or fractions) per proxy-evaluation task")
    solutions_per_budget: int = Field(2, ge=1)
    each_width: bool = Field(True, description="per budget, also hand phase 3 the best student of every other interface width: "
                             "the unfinetuned proxy ranks narrow interfaces below full-width students they pass in finetuning")
    max_size_mb: Optional[float] = Field(None, gt=0, description="model size limit (weights at their bit-widths), as HAWQV3 eq. 11.9")
    max_gbops: Optional[float] = Field(None, gt=0, description="bit-operations limit at the base resolution (GBOPs), as HAWQV3 eq. 11.10")
    predictor: PredictorConfig = Field(default_factory=PredictorConfig)


class FinetuneConfig(_Strict):
    """Phase 3 (``finetune``): the selected students trained end to end with elastic resolution."""

    epochs: int = Field(6, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(64, ge=1)
    kd_weight: float = Field(0.7, ge=0, le=1, description="weight of the distillation term; the rest is cross-entropy")
    temperature: float = Field(2.0, gt=0)
    max_students: int = Field(8, ge=1)
    num_cpus: float = Field(1, gt=0, description="CPUs of each student's trial (of each worker, with workers > 1)")
    num_gpus: float = Field(0, ge=0, description="GPUs of each student's trial (of each worker, with workers > 1)")
    workers: int = Field(1, ge=1, description="data-parallel Ray Train workers per student (e.g. its GPUs); 1 trains in the trial")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on CUDA (auto: bf16 where supported)")
    resolution_bn_batches: int = Field(100, ge=0, description="training batches that re-estimate a student's BatchNorm statistics "
                                       "at each resolution below the largest, where it is then evaluated and exported (0: keep "
                                       "the largest resolution's)")

    PLACEMENT: ClassVar[frozenset] = frozenset({"max_students", "num_cpus", "num_gpus"})  # where and how many, not how
    AFTER_TRAINING: ClassVar[frozenset] = frozenset({"resolution_bn_batches"})  # redone on the trained weights, not retrained

    def recipe(self) -> str:
        """Hash of the settings a finetuned student's weights depend on (defaults left out, as in the space's hashes):
        a student kept under another recipe (more epochs, another learning rate) is finetuned again on resume."""
        return settings_digest(self.model_dump(mode="json", exclude=set(self.PLACEMENT | self.AFTER_TRAINING), exclude_defaults=True))


class TrackingConfig(_Strict):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "eta"


class SearchSpace(_Strict):
    name: str
    seed: int = 0
    teacher: TeacherConfig
    data: DataConfig
    pool: list[PoolEntry] = Field(..., min_length=1)
    bits: list[int] = Field(default_factory=lambda: [32])
    resolutions: list[int] = Field(default_factory=list, description="the finetune phase's elastic resolutions; empty = data.resolution only")
    widths: list[float] = Field(default_factory=lambda: [1.0], description="interface widths: fractions of the teacher's channels a "
                                "student keeps between its blocks (eta.interfaces); [1.0] keeps the teacher's")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    budgets: list[Union[float, str]] = Field(..., min_length=1)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    solve: SolveConfig = Field(default_factory=SolveConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _phase_section_names(cls, data):
        """Spaces written before the phases had one name call their sections phase1/phase2/phase3."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in LEGACY_SECTIONS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"sections '{old}' and '{new}' are the same phase's settings; keep '{new}'")
                data[new] = data.pop(old)
        return data

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not RUN_NAME.match(v) or v in (".", ".."):
            raise ValueError(f"{v!r}: the name of the run folder, one folder name (letters, digits, '.', '_', '-'; no '/' or '..')")
        return v

    @field_validator("resolutions")
    @classmethod
    def _resolution_sizes(cls, v: list[int]) -> list[int]:
        return _each(v, lambda r: r >= 4, "resolution {}: input sizes are at least 4 pixels")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("widths: give at least one interface width (1.0 keeps the teacher's)")
        return sorted({float(w) for w in _each(v, lambda w: 0 < w <= 1, "interface width {}: a fraction of the teacher's channels, in (0, 1]")})

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        for b in v:
            if b not in (32, 8, 4):
                raise ValueError(f"bit-width {b} not supported (choose from 32, 8, 4)")
        return sorted(set(v), reverse=True)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v):
        for raw in v:
            try:
                Budget.parse(raw)
            except EtaError as err:
                raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _resolutions(self):
        if not self.resolutions:
            self.resolutions = [self.data.resolution]
        self.resolutions = sorted(set(self.resolutions))
        return self

    # --- derived views -------------------------------------------------------------------
    def op_specs(self) -> list[OpSpec]:
        """Every candidate operator of the pool (before per-block shape filtering), bits included.

        Families without integer kernels (identity, transformer blocks) are offered at 32 bits only;
        whether a given block can run at a bit-width is decided when binding (``bound.bind``).
        """
        specs = []
        for entry in self.pool:
            quantizable = families.get(entry.family).integer
            for spec in entry.specs():
                specs.extend(spec.with_bits(b).with_width(w) for b in (self.bits if quantizable else [32]) for w in self.widths)
        return sorted(set(specs), key=str)

    def parsed_budgets(self) -> list[Budget]:
        return [Budget.parse(b) for b in self.budgets]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Content hash of everything that defines the run; budgets and tracking may change on resume."""
        return self.section_hash(exclude=("tracking", "budgets"))

    def section_hash(self, *, include: tuple = (), exclude: tuple = (), spelled: dict | None = None) -> str:
        """Hash of some top-level sections; settings left at their defaults do not count.

        So a new setting added to eta (with a default that keeps the old behaviour) leaves the
        hashes of existing runs unchanged, and they resume instead of starting over. ``spelled``
        hashes sections under other names (how runs of an older layout hashed them).
        """
        d = self.model_dump(mode="json", exclude_defaults=True)
        if include:
            d = {k: d[k] for k in include if k in d}
        for k in exclude:
            d.pop(k, None)
        if spelled:
            d = {spelled.get(k, k): v for k, v in d.items()}
        return settings_digest(d)


def settings_digest(d: dict) -> str:
    """A short content hash of settings (JSON, keys sorted): the one hash of spaces, phases and finetune recipes."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: field '{loc}': {msg}{more}"


def parse_space(data, where: str = "search space") -> SearchSpace:
    if not isinstance(data, dict):
        raise EtaError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as err:
        raise EtaError(_format_validation_error(err, where)) from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a YAML search space; every problem becomes one EtaError line."""
    path = Path(path)
    if not path.is_file():
        raise EtaError(f"search space not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise EtaError(f"{path}:{at}: malformed YAML: {problem}") from None
    return parse_space(data, str(path))


def dump_space(space: SearchSpace) -> str:
    return yaml.safe_dump(space.to_dict(), sort_keys=False)
