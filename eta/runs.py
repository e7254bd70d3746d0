"""The run directory: one folder per search, a manifest of finished phases, atomic writes.

Every phase reads and writes only under ``runs/<name>/``. A phase is marked done in
``manifest.json`` only after all its outputs are on disk, so a killed search resumes from the
first unfinished phase; an existing run with a different search space is never overwritten
without ``force``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import EtaError
from .space import SearchSpace, dump_space, load_space

log = logging.getLogger(__name__)

PHASES = ("teacher", "latency", "pretrain", "solve", "finetune")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EtaError(f"missing file: {path}") from None
    except json.JSONDecodeError as err:
        raise EtaError(f"corrupt JSON in {path}: {err.msg} at line {err.lineno}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EtaError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise EtaError(f"corrupt weights file {path}: {str(err).splitlines()[0]}") from None


class Run:
    """A search's folder on disk and its manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- locations ---------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def space_path(self) -> Path:
        return self.root / "space.yaml"

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # --- creation and resume -------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, runs_dir: Path, space: SearchSpace, name: str | None = None, force: bool = False) -> "Run":
        run = cls(Path(runs_dir) / (name or space.name))
        if run.manifest_path.exists():
            manifest = run.manifest()
            if manifest.get("space_fingerprint") == space.fingerprint() and not force:
                done = [p for p in PHASES if run.is_done(p)]
                log.info("resuming run %s (finished: %s)", run.root, ", ".join(done) or "nothing yet")
                with atomic_path(run.space_path) as tmp:  # budgets may differ; phases notice by their inputs hash
                    tmp.write_text(dump_space(space))
                return run
            if not force:
                raise EtaError(
                    f"run {run.root} exists with a different search space; choose another --name or pass --force to overwrite it"
                )
            log.warning("--force: removing existing run %s", run.root)
            shutil.rmtree(run.root)
        run.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.space_path) as tmp:
            tmp.write_text(dump_space(space))
        write_json(
            run.manifest_path,
            {
                "name": run.root.name,
                "space_fingerprint": space.fingerprint(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": _versions(),
                "phases": {},
            },
        )
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        run = cls(Path(path))
        if not run.manifest_path.exists():
            raise EtaError(f"not an eta run directory (no manifest.json): {path}")
        return run

    def space(self) -> SearchSpace:
        return load_space(self.space_path)

    def manifest(self) -> dict:
        return read_json(self.manifest_path)

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


def _versions() -> dict:
    import importlib.metadata as md

    out = {"eta": __version__}
    for pkg in ("torch", "timm", "ray", "gekko", "apache-tvm", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
