"""The run directory: one folder per search, a manifest of finished phases, and every path in it.

Every phase reads and writes only under ``runs/<name>/``, through the paths :class:`Run` names
(nothing else spells them out). A phase is marked done in ``manifest.json`` only after all its
outputs are on disk, so a killed search resumes from the first unfinished phase; an existing run
with a different search space is never overwritten without ``force``. Runs written by earlier
versions of eta are migrated in place when opened (:data:`FORMAT`).

Layout (one folder per phase, named as the phase)::

    space.yaml  manifest.json  pareto.json  pareto.png  .lock
    teacher/teacher.safetensors
    latency/latency.json  latency/table.json  latency/validation.json
    pretrain/block_<b>.safetensors  pretrain/metrics.json
    solve/samples.json  solve/predictor.pt  solve/predictor.json  solve/quantization.json  solve/solved.json  solve/solutions.json
    finetune/<student id>/weights.safetensors  finetune/<student id>/metrics.json  finetune/tune/
    wandb/  benchmarks/
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from . import __version__
from .errors import EtaError
from .files import atomic_path, read_json, write_json
from .space import LEGACY_SECTIONS, RUN_NAME, SearchSpace, dump_space, load_space

log = logging.getLogger(__name__)

PHASES = ("teacher", "latency", "pretrain", "solve", "finetune")
# the space's sections each phase depends on (cumulative: a phase also depends on everything before it)
PHASE_INPUTS = {
    "teacher": ("seed", "teacher", "data"),
    "latency": ("pool", "bits", "widths", "latency", "resolutions"),
    "pretrain": ("pretrain",),
    "solve": ("budgets", "solve"),
    "finetune": ("finetune",),
}
# a change to these resumes a run: the inputs of its last two phases, and tracking (which no phase reads)
LATE_SECTIONS = ("tracking", *PHASE_INPUTS["solve"], *PHASE_INPUTS["finetune"])
FORMAT = 2  # 1: folders phase1/phase2/phase3 and space sections of those names; 2: named after the phases
LEGACY_FOLDERS = {"phase1": "pretrain", "phase2": "solve", "phase3": "finetune"}


def check_run_name(name: str) -> str:
    """A run name is one plain folder name: no separators, no '..'."""
    if not RUN_NAME.match(name or "") or name in (".", ".."):
        raise EtaError(f"--name {name!r}: a run name is one folder name (letters, digits, '.', '_', '-'; no '/' or '..')")
    return name


def phase_inputs(space: SearchSpace, phase: str, spelled: dict | None = None) -> str:
    """The hash of every setting ``phase`` depends on, as the manifest records it."""
    keys: tuple = ()
    for p in PHASES:
        keys += PHASE_INPUTS[p]
        if p == phase:
            break
    return space.section_hash(include=keys, spelled=spelled)


class Run:
    """A search's folder on disk: its manifest, and the path of everything the phases write."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- paths --------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def space_path(self) -> Path:
        return self.root / "space.yaml"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def teacher_weights(self) -> Path:
        return self.root / "teacher" / "teacher.safetensors"

    @property
    def latency_dir(self) -> Path:
        return self.root / "latency"

    @property
    def latency_info(self) -> Path:
        return self.latency_dir / "latency.json"

    @property
    def latency_table_copy(self) -> Path:
        return self.latency_dir / "table.json"

    @property
    def latency_validation(self) -> Path:
        return self.latency_dir / "validation.json"

    @property
    def pretrain_dir(self) -> Path:
        return self.root / "pretrain"

    def block_weights(self, block: int) -> Path:
        return self.pretrain_dir / f"block_{block:02d}.safetensors"

    @property
    def pretrain_metrics(self) -> Path:
        return self.pretrain_dir / "metrics.json"

    @property
    def solve_dir(self) -> Path:
        return self.root / "solve"

    @property
    def samples(self) -> Path:
        return self.solve_dir / "samples.json"

    @property
    def predictor_weights(self) -> Path:
        return self.solve_dir / "predictor.pt"

    @property
    def predictor_metrics(self) -> Path:
        return self.solve_dir / "predictor.json"

    @property
    def quantization(self) -> Path:
        return self.solve_dir / "quantization.json"

    @property
    def solved(self) -> Path:
        return self.solve_dir / "solved.json"

    @property
    def solutions(self) -> Path:
        return self.solve_dir / "solutions.json"

    @property
    def finetune_dir(self) -> Path:
        return self.root / "finetune"

    def student_dir(self, student_id: str) -> Path:
        return self.finetune_dir / student_id

    def student_weights(self, student_id: str, resolution: int | None = None) -> Path:
        """The finetuned weights; at ``resolution``, those with BatchNorm statistics of that resolution."""
        name = "weights.safetensors" if resolution is None else f"weights_{int(resolution)}px.safetensors"
        return self.student_dir(student_id) / name

    def student_metrics(self, student_id: str) -> Path:
        return self.student_dir(student_id) / "metrics.json"

    @property
    def tune_dir(self) -> Path:
        return self.finetune_dir / "tune"

    @property
    def pareto_json(self) -> Path:
        return self.root / "pareto.json"

    @property
    def pareto_png(self) -> Path:
        return self.root / "pareto.png"

    @property
    def wandb_dir(self) -> Path:
        return self.root / "wandb"

    @property
    def benchmarks_dir(self) -> Path:
        """What benchmarks compute from a finished run and keep, so a rerun of a benchmark resumes."""
        return self.root / "benchmarks"

    def relative(self, path: Path) -> str:
        """A path inside the run as the run's files record it (relative, so a run can move)."""
        return str(Path(path).relative_to(self.root))

    # --- creation and resume ------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, runs_dir: Path, space: SearchSpace, name: str | None = None, force: bool = False) -> "Run":
        run = cls(Path(runs_dir) / check_run_name(name or space.name))
        if run.manifest_path.exists():
            run.migrate()
            manifest = run.manifest()
            same = manifest.get("space_fingerprint") == space.fingerprint()
            late = None if same else run.late_changes(space)
            if (same or late is not None) and not force:
                done = [p for p in PHASES if run.is_done(p)]
                log.info("resuming run %s (finished: %s)", run.root, ", ".join(done) or "nothing yet")
                if late is not None:
                    log.info("run %s: new %s settings; the phases that read them run again", run.root, ", ".join(late))
                    write_json(run.manifest_path, {**manifest, "space_fingerprint": space.fingerprint()})
                with atomic_path(run.space_path) as tmp:  # budgets may differ; phases notice by their inputs hash
                    tmp.write_text(dump_space(space))
                return run
            if not force:
                raise EtaError(
                    f"run {run.root} exists with a different search space; choose another --name or pass --force to overwrite it"
                )
            log.warning("--force: removing existing run %s", run.root)
            for child in run.root.iterdir():  # the lock file stays: this process holds it
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        run.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.space_path) as tmp:
            tmp.write_text(dump_space(space))
        write_json(run.manifest_path, {"name": run.root.name, "format": FORMAT, "space_fingerprint": space.fingerprint(),
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(), "phases": {}})
        return run

    def late_changes(self, space: SearchSpace) -> list[str] | None:
        """The sections of the last phases (solve, finetune) in which ``space`` differs from the run's, or None
        when it differs elsewhere too. What came before stays valid; the later phases notice by their inputs hash."""
        try:
            old = load_space(self.space_path)
        except (EtaError, OSError):
            return None
        if old.section_hash(exclude=LATE_SECTIONS) != space.section_hash(exclude=LATE_SECTIONS):
            return None
        return [s for s in LATE_SECTIONS if old.section_hash(include=(s,)) != space.section_hash(include=(s,))]

    @classmethod
    def open(cls, path: Path) -> "Run":
        run = cls(Path(path))
        if not run.manifest_path.is_file():
            raise EtaError(f"not an eta run directory (no manifest.json): {path}")
        run.migrate()
        return run

    def space(self) -> SearchSpace:
        return load_space(self.space_path)

    def manifest(self) -> dict:
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("phases", {}), dict):
            raise EtaError(f"{self.manifest_path}: not an eta manifest (expected an object with 'phases')")
        fmt = manifest.get("format", 1)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise EtaError(f"{self.manifest_path}: field 'format' is {fmt!r}, not a run format (1 to {FORMAT})")
        if fmt > FORMAT:
            raise EtaError(f"{self.manifest_path}: run format {fmt} was written by a newer eta (this one reads formats 1 to {FORMAT})")
        for phase, info in manifest.get("phases", {}).items():
            if not isinstance(info, dict):
                raise EtaError(f"{self.manifest_path}: field 'phases.{phase}' is {type(info).__name__} {info!r:.40}, not an object")
        return manifest

    def is_done(self, phase: str, inputs: str | None = None) -> bool:
        """Finished, and (when ``inputs`` is given) finished with the same inputs hash."""
        info = self.manifest().get("phases", {}).get(phase, {})
        return info.get("status") == "done" and (inputs is None or info.get("inputs") == inputs)

    def mark_done(self, phase: str, **info) -> None:
        manifest = self.manifest()
        manifest.setdefault("phases", {})[phase] = {"status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        write_json(self.manifest_path, manifest)

    def invalidate(self, *phases: str) -> None:
        """Forget that phases finished (a re-run of an earlier phase makes later ones stale)."""
        manifest = self.manifest()
        for p in phases:
            manifest.get("phases", {}).pop(p, None)
        write_json(self.manifest_path, manifest)

    def phase_info(self, phase: str) -> dict:
        return self.manifest().get("phases", {}).get(phase, {})

    # --- migration ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring a run written by an earlier eta to the current layout, in place; a no-op when current.

        Format 1 → 2: folders ``phase1/2/3`` become ``pretrain/solve/finetune`` (and the weights paths
        of ``pareto.json`` follow), the space's sections are renamed alike, and the manifest's hashes,
        which name the sections, are recomputed where they matched the old names' hashes, so finished
        phases stay finished.
        """
        manifest = self.manifest()
        if manifest.get("format", 1) >= FORMAT:
            return
        old_space = load_space(self.space_path)  # reads the legacy section names
        for old, new in LEGACY_FOLDERS.items():
            if (self.root / old).is_dir() and not (self.root / new).exists():
                (self.root / old).rename(self.root / new)
        if self.pareto_json.is_file():
            text = self.pareto_json.read_text()
            write_json(self.pareto_json, json.loads(text.replace('"phase3/', '"finetune/')))
        spelled = {new: old for old, new in LEGACY_SECTIONS.items()}
        if manifest.get("space_fingerprint") == old_space.section_hash(exclude=("tracking", "budgets"), spelled=spelled):
            manifest["space_fingerprint"] = old_space.fingerprint()
        for phase in PHASES:
            info = manifest.get("phases", {}).get(phase)
            if info and info.get("inputs") == phase_inputs(old_space, phase, spelled=spelled):
                info["inputs"] = phase_inputs(old_space, phase)
        manifest["format"] = FORMAT
        with atomic_path(self.space_path) as tmp:
            tmp.write_text(dump_space(old_space))
        write_json(self.manifest_path, manifest)
        log.info("run %s: migrated from format %d to %d", self.root, 1, FORMAT)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"eta": __version__}
    for pkg in ("torch", "timm", "ray", "gekko", "apache-tvm", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
