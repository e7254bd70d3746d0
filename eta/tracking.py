"""Weights & Biases tracking: one W&B group per search, one W&B run per phase.

A run per phase (rather than one run with sections) because phases are the unit of resume: a
phase re-run after a crash gets a fresh W&B run instead of appending to a half-finished one.
Offline by default so no account is needed; ``wandb sync runs/<name>/wandb`` uploads later.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import EtaError, first_line

log = logging.getLogger(__name__)


class PhaseTracker:
    """Logs one phase of one search. With mode ``disabled`` every call is a no-op."""

    def __init__(self, run_root: Path, phase: str, *, mode: str = "offline", project: str = "eta", config: dict | None = None):
        self.mode = mode
        self._run = None
        if mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_root = Path(run_root)
        try:
            self._run = self._init(wandb, run_root, phase, mode, project, config)
        except Exception as err:  # noqa: BLE001 - wandb raises many types (files, network, settings)
            raise EtaError(f"W&B ({mode}) could not start in {run_root / 'wandb'}: {first_line(err)}; "
                           "turn tracking off with tracking.wandb: disabled (or --wandb disabled)") from None

    @staticmethod
    def _init(wandb, run_root: Path, phase: str, mode: str, project: str, config: dict | None):
        return wandb.init(
            project=project,
            group=run_root.name,
            name=f"{run_root.name}-{phase}",
            job_type=phase,
            dir=str(run_root),
            mode=mode,
            config=config or {},
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def summary(self, **values) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def image(self, key: str, path: Path) -> None:
        if self._run is not None and Path(path).exists():
            import wandb

            self._run.log({key: wandb.Image(str(path))})

    def artifact(self, name: str, kind: str, paths: list[Path], metadata: dict | None = None) -> None:
        if self._run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind, metadata=metadata)
            for p in paths:
                p = Path(p)
                if p.is_dir():
                    art.add_dir(str(p), name=p.name)
                elif p.exists():
                    art.add_file(str(p))
            self._run.log_artifact(art)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
