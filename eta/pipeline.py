"""The search, phase by phase, over one run directory: ordering, input hashes and invalidation.

Phases run in the order teacher → latency → pretrain → solve → finetune (latency before
pretraining, so an infeasible budget is reported before any training; its modules compile on the
cores the teacher's training leaves idle); each lives in its own module of :mod:`eta.phases`.
Each phase records the hash of the settings it depends on (:func:`eta.runs.phase_inputs`); a
phase is skipped on resume when it finished with the same settings, and re-run (with every later
phase) when they changed. One process at a time owns a run directory: a :class:`Search` holds its
lock until :meth:`Search.close`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from .bound import bind, splits_for
from .errors import EtaError
from .locks import run_lock
from .phases import finetune, latency, pretrain, solve, teacher
from .phases.context import PhaseContext
from .runs import PHASES, Run, check_run_name, phase_inputs
from .space import SearchSpace

log = logging.getLogger(__name__)


class Search:
    """One search over one run directory. :meth:`phase` runs (or resumes) one phase, :meth:`run_all` all."""

    def __init__(self, space: SearchSpace, *, runs_dir: Path = Path("runs"), name: str | None = None, force: bool = False,
                 address: str | None = None, num_cpus: int | None = None, progress: bool = True):
        root = Path(runs_dir) / check_run_name(name or space.name)
        splits = splits_for(space)  # missing data fails here, before a run folder exists
        bound = bind(space, splits)  # so does a teacher that cannot be split
        if space.teacher.checkpoint:  # and the user's weights: unreadable, or another network's
            try:
                bound.load_teacher_weights(Path(space.teacher.checkpoint))
            except EtaError as err:
                raise EtaError(f"teacher.checkpoint: {err}") from None
        self._locks = ExitStack()
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._locks.enter_context(run_lock(root))
            run = Run.create_or_resume(runs_dir, space, name=root.name, force=force)
        except BaseException:
            self._locks.close()
            raise
        self.ctx = PhaseContext(space, bound, splits, run, progress=progress, address=address, num_cpus=num_cpus)

    @classmethod
    def from_run(cls, run_dir: Path, **kw) -> "Search":
        run = Run.open(run_dir)
        return cls(run.space(), runs_dir=run.root.parent, name=run.root.name, **kw)

    def close(self) -> None:
        """Release the run directory for other processes."""
        self._locks.close()

    def __enter__(self) -> "Search":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what the phases share -------------------------------------------------------------------
    @property
    def space(self) -> SearchSpace:
        return self.ctx.space

    @property
    def bound(self):
        return self.ctx.bound

    @property
    def splits(self):
        return self.ctx.splits

    @property
    def run(self) -> Run:
        return self.ctx.run

    @property
    def teacher_path(self) -> Path:
        return self.ctx.teacher_path

    def done(self, phase: str) -> bool:
        return self.run.is_done(phase, phase_inputs(self.space, phase))

    def _finish(self, phase: str, **info) -> None:
        self.run.mark_done(phase, inputs=phase_inputs(self.space, phase), **info)
        later = PHASES[PHASES.index(phase) + 1:]
        stale = [p for p in later if self.run.is_done(p) and not self.done(p)]
        if stale:
            self.run.invalidate(*stale)

    def _clear(self, folder: Path) -> None:
        if folder.exists():  # a re-run starts afresh
            shutil.rmtree(folder)

    def _check_tracking(self) -> None:
        """Before a phase does any work: W&B (when on) can write its folder in the run."""
        if self.space.tracking.wandb == "disabled":
            return
        d = self.run.wandb_dir
        if d.exists() and not d.is_dir():
            problem = "is a file, not a folder"
        elif not os.access(d if d.exists() else d.parent, os.W_OK):
            problem = "is not writable"
        else:
            return
        raise EtaError(f"W&B folder {d} {problem}: move it away, or turn tracking off (tracking.wandb: disabled, --wandb disabled)")

    # --- the phases ------------------------------------------------------------------------------
    def run_all(self, force_phases: tuple = ()) -> dict:
        t0 = time.time()
        to_run = [p for p in ("teacher", "latency") if p in force_phases or not self.done(p)]
        if to_run == ["teacher", "latency"]:  # the table compiles on the cores training leaves idle (latency needs no weights)
            latency.compile_table_ahead(self.ctx, teacher.idle_cores(self.ctx))
        for phase in PHASES:
            out = self.phase(phase, force=phase in force_phases)
        return {**out, "wall_s_this_invocation": time.time() - t0}

    def phase(self, name: str, force: bool = False, **options):
        """Run phase ``name`` (its prerequisites first, loaded when finished), or load it when it finished
        with the same settings and ``force`` is not set. Returns the phase's output."""
        return getattr(self, f"_{name}")(force, **options)

    def _teacher(self, force: bool):
        if self.done("teacher") and not force:
            return teacher.load(self.ctx)
        self._check_tracking()
        info = teacher.run(self.ctx)
        self._finish("teacher", **info)
        return info

    def _latency(self, force: bool):
        if self.done("latency") and not force:
            return latency.load(self.ctx)
        self._check_tracking()
        info, note, changed = latency.run(self.ctx)
        later = [p for p in ("solve", "finetune") if self.run.is_done(p)]
        if changed and later:  # same settings, new measurements: what was solved and measured from the old ones is redone
            log.info("latency: the table's figures changed; %s will run again", " and ".join(later))
            self.run.invalidate(*later)
        self._finish("latency", **note)
        return info

    def _pretrain(self, force: bool):
        if self.done("pretrain") and not force:
            return pretrain.load(self.ctx)
        self._check_tracking()
        self._teacher(False)  # what the phase needs is read before a re-run clears anything
        if force:
            self._clear(self.run.pretrain_dir)
        metrics, note = pretrain.run(self.ctx)
        self._finish("pretrain", **note)
        return metrics

    def _solve(self, force: bool):
        if self.done("solve") and not force:
            return solve.load(self.ctx)
        self._check_tracking()
        self._teacher(False)  # what the phase needs is read before a re-run clears anything
        info = self._latency(False)
        blocks = pretrain.load_block_states(self.run, self.bound)
        if force:
            self._clear(self.run.solve_dir)
        out, note = solve.run(self.ctx, info, blocks)
        self._finish("solve", **note)
        return out

    def _finetune(self, force: bool, remeasure: bool = False):
        """``remeasure``: keep the finetuned students, tune what their networks still lack (tasks a time limit left
        untried, or a larger trial budget) and time again what that changed, then rebuild the front."""
        if self.done("finetune") and not (force or remeasure):
            return finetune.load(self.ctx)
        self._check_tracking()
        self._teacher(False)  # what the phase needs is read before a re-run clears anything
        info = self._latency(False)
        archs = solve.selected_archs(self.ctx)
        pretrain.load_block_states(self.run, self.bound)  # checked here: the trials load them on their nodes
        if force and not remeasure:
            self._clear(self.run.finetune_dir)
        out, note = finetune.run(self.ctx, info, archs)
        self._finish("finetune", **note)
        return out

    def validate_latency(self, students: int = 50, seed: int | None = None, plot: Path | None = None) -> dict:
        """``eta latency validate``: calibrate on ``students`` whole networks, stored with the shared table.

        This run's latency phase is re-run to use the new calibration, unless budgets were already
        solved with the old one (then it says how to re-solve).
        """
        report = latency.validate(self.ctx, students, seed, plot)
        if self.done("latency") and not self.done("solve"):
            self.run.invalidate("latency")
        elif self.done("solve"):
            log.info("run %s solved its budgets with its earlier calibration; 'eta latency build %s --rerun' and "
                     "'eta solve %s --rerun' use this one", self.run.root, self.run.root, self.run.root)
        return report
