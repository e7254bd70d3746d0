"""The search, phase by phase, over one run directory.

Phases run in the order teacher → latency → pretrain → solve → finetune (latency before
pretraining so an infeasible budget is reported before any training). Each phase records the hash
of the settings it depends on; a phase is skipped on resume when it finished with the same
settings, and re-run (with every later phase) when they changed.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path


from .bound import BoundSpace, bind, splits_for
from .errors import EtaError
from .runs import PHASES, Run, read_json, save_tensors, write_json
from .space import SearchSpace
from .tracking import PhaseTracker

log = logging.getLogger(__name__)

# settings each phase depends on (cumulative: a phase also depends on everything before it)
PHASE_INPUTS = {
    "teacher": ("seed", "teacher", "data"),
    "latency": ("pool", "bits", "latency", "resolutions"),
    "pretrain": ("phase1",),
    "solve": ("budgets", "phase2"),
    "finetune": ("phase3",),
}


def phase_inputs(space: SearchSpace, phase: str) -> str:
    keys = ()
    for p in PHASES:
        keys += PHASE_INPUTS[p]
        if p == phase:
            break
    return space.section_hash(include=keys)


class Search:
    """One search over one run directory. Methods run (or resume) single phases."""

    def __init__(self, space: SearchSpace, *, runs_dir: Path = Path("runs"), name: str | None = None, force: bool = False,
                 address: str | None = None, num_cpus: int | None = None, progress: bool = True):
        self.splits = splits_for(space)  # missing data fails here, before a run folder exists
        self.bound: BoundSpace = bind(space, self.splits)  # so does a teacher that cannot be split
        self.run = Run.create_or_resume(runs_dir, space, name=name, force=force)
        self.space = space
        self.address = address
        self.num_cpus = num_cpus
        self.progress = progress
        self._ray = None

    @classmethod
    def from_run(cls, run_dir: Path, **kw) -> "Search":
        run = Run.open(run_dir)
        return cls(run.space(), runs_dir=run.root.parent, name=run.root.name, **kw)

    # --- plumbing ----------------------------------------------------------------------------
    def tracker(self, phase: str) -> PhaseTracker:
        t = self.space.tracking
        return PhaseTracker(self.run.root, phase, mode=t.wandb, project=t.project, config=self.space.to_dict())

    def _ray_session(self):
        from .raycluster import ray_session

        return ray_session(self.address, num_cpus=self.num_cpus)

    def done(self, phase: str) -> bool:
        return self.run.is_done(phase, phase_inputs(self.space, phase))

    def _finish(self, phase: str, **info) -> None:
        self.run.mark_done(phase, inputs=phase_inputs(self.space, phase), **info)
        later = PHASES[PHASES.index(phase) + 1 :]
        stale = [p for p in later if self.run.is_done(p) and not self.done(p)]
        if stale:
            self.run.invalidate(*stale)

    @property
    def teacher_path(self) -> Path:
        ck = self.space.teacher.checkpoint
        return Path(ck) if ck else self.run.root / "teacher" / "teacher.safetensors"

    # --- phases --------------------------------------------------------------------------------
    def run_all(self, force_phases: tuple = ()) -> dict:
        t0 = time.time()
        for phase in PHASES:
            getattr(self, f"phase_{phase}")(force=phase in force_phases)
        result = read_json(self.run.root / "pareto.json")
        result["wall_s_this_invocation"] = time.time() - t0
        return result

    def phase_teacher(self, force: bool = False) -> dict:
        from .train import evaluate, fit

        space = self.space
        res = space.data.resolution
        if self.done("teacher") and not force:
            self.bound.load_teacher_weights(self.teacher_path)
            return self.run.phase_info("teacher")
        t0 = time.time()
        if space.teacher.checkpoint:
            self.bound.load_teacher_weights(self.teacher_path)
        elif space.teacher.pretrained:
            from .teachers import pretrained_state

            self.bound.teacher.load_state_dict(pretrained_state(space.teacher.model, self.bound))
            save_tensors(self.teacher_path, self.bound.teacher.state_dict(), {"model": space.teacher.model, "source": "timm pretrained"})
        else:
            tc = space.teacher.train
            log.info("training the teacher %s on %s (%d epochs)", space.teacher.model, space.data.dataset, tc.epochs)
            fit(self.bound.teacher, self.splits.train, epochs=tc.epochs, lr=tc.lr, weight_decay=tc.weight_decay,
                batch_size=tc.batch_size, resolutions=[res], label_smoothing=tc.label_smoothing, seed=space.seed,
                desc="teacher", progress=self.progress)
            save_tensors(self.teacher_path, self.bound.teacher.state_dict(), {"model": space.teacher.model})
        acc = {str(r): evaluate(self.bound.teacher, self.splits.test, resolution=r) for r in space.resolutions}
        info = {"checkpoint": str(self.teacher_path), "test_acc": acc, "train_s": time.time() - t0}
        with self.tracker("teacher") as tr:
            tr.summary(**{f"teacher_test_acc@{r}": a for r, a in acc.items()})
        self._finish("teacher", **info)
        log.info("teacher test accuracy at %dpx: %.4f", res, acc[str(res)])
        return info

    def phase_latency(self, force: bool = False) -> dict:
        path = self.run.dir("latency") / "latency.json"
        if self.done("latency") and not force:
            info = read_json(path)
            self.check_budgets(info)
            return info
        with self._latency_session():
            backend, table, executor, items, base, per_block, calib = self._table_and_calibration(
                self.space.latency.calibration_students, self.space.seed)
            teacher = self.measure_network_all_resolutions(table, None, executor)
        info = {
            "backend": backend.name,
            "schedule": backend.schedule,
            "target": backend.target,
            "device": backend.device,
            "table": str(table.path),
            "base_ms": base,
            "option_ms": [r.tolist() for r in per_block],
            "options": [[str(s) for s in opts] for opts in self.bound.options],
            "calibration": calib,
            "teacher_ms": teacher,
            "io": {"in_chans": self.bound.in_chans, "num_classes": self.bound.num_classes},
        }
        shutil.copyfile(table.path, self.run.root / "latency" / "table.json")
        previous = read_json(path) if path.exists() else None
        write_json(path, info)
        changed = previous is not None and any(previous.get(k) != info[k] for k in ("option_ms", "calibration", "teacher_ms", "base_ms"))
        later = [p for p in ("solve", "finetune") if self.run.is_done(p)]
        if changed and later:  # same settings, new measurements: what was solved and measured from the old ones is redone
            log.info("latency phase: the table's figures changed; %s will run again", " and ".join(later))
            self.run.invalidate(*later)
        with self.tracker("latency") as tr:
            tr.summary(teacher_ms=teacher[str(self.space.data.resolution)], calibration_a=calib["a"], calibration_b=calib["b"], entries=len(items))
            tr.table("latency/calibration", ["arch", "table_sum_ms", "measured_ms"], [[r["arch"], r["table_sum_ms"], r["measured_ms"]] for r in calib["students"]])
        self._finish("latency", entries=len(items))
        self.check_budgets(info)
        return info

    def validate_latency(self, students: int = 50, seed: int | None = None, plot: Path | None = None) -> dict:
        """Compile ``students`` random whole students, compare with the table's sums, store the calibration.

        The calibration lands in the shared table (under this space's key), where every later
        search of the space finds it; this run's latency phase is re-run to use it.
        """
        from . import lut

        with self._latency_session():
            backend, table, _, _, _, _, cal = self._table_and_calibration(students, self.space.seed if seed is None else seed)
        report = {"backend": backend.name, "schedule": backend.schedule, "device": backend.device, "table": str(table.path), **cal}
        write_json(self.run.dir("latency") / "validation.json", report)
        if plot:
            lut.plot_calibration(cal, Path(plot), f"{self.space.name}: {backend.name} ({backend.schedule}) on {backend.device}")
        if self.done("latency") and not self.done("solve"):
            self.run.invalidate("latency")  # re-run on resume, with this calibration
        elif self.done("solve"):
            log.info("run %s solved its budgets with its earlier calibration; 'eta latency build %s --rerun' and "
                     "'eta solve %s --rerun' use this one", self.run.root, self.run.root, self.run.root)
        return report

    def _table_and_calibration(self, students: int, seed: int):
        """Measure the space's table entries not cached yet, read the option latencies, calibrate on whole networks."""
        from . import lut

        backend, table, executor = self.latency_backend()
        items = lut.table_items(self.bound)
        log.info("latency table: %d entries on %s (%s, %s), cached in %s", len(items), backend.device, backend.name, backend.schedule, table.path)
        table.measure_many(items, desc="latency table", progress=self.progress, executor=executor)
        base, per_block = lut.option_latency_matrix(self.bound, table)
        calib = lut.calibrate(self.bound, table, base, per_block, n_students=students, seed=seed, progress=self.progress,
                              executor=executor, items=items)
        return backend, table, executor, items, base, per_block, calib

    def _latency_session(self):
        """A Ray session when a named node measures latency; nothing otherwise."""
        from contextlib import nullcontext

        return self._ray_session() if self.space.latency.node_resource else nullcontext()

    def latency_backend(self):
        """(backend, its shared table, how one entry is measured) for this space."""
        from . import lut

        backend = lut.Backend.from_space(self.bound)
        table, executor = lut.open_table(backend), backend.executor()
        tolerance = self.space.latency.drift_tolerance
        if tolerance is not None:  # entries from another machine are measured again
            table.check_drift(lut.table_items(self.bound), executor, tolerance=tolerance)
        return backend, table, executor

    def measure_network_all_resolutions(self, table, arch, executor=None) -> dict:
        """End-to-end latency of the teacher (arch None) or a student at every resolution, cached in the table.

        Like every table entry, each network is compiled and timed twice and the faster kept (both
        are in its entry): a burst of load during one measurement (seen here: 6.1 ms for a network
        that times 3.1–3.3 ms) must not become the front's figure.
        """
        from .lut import _signature
        from .student import latency_network

        batch = self.space.latency.batch_size
        model = self.bound.teacher if arch is None else latency_network(self.bound, arch)
        sig = _signature("network", model)
        items = [(sig, (lambda m=model: m), (batch, self.bound.in_chans, r, r), 32) for r in self.space.resolutions]
        table.measure_many(items, desc="whole-network latency", progress=False, executor=executor)
        return {str(r): float(table.get(sig, (batch, self.bound.in_chans, r, r), 32)) for r in self.space.resolutions}

    def budgets_ms(self, info: dict) -> list[float]:
        teacher_ms = info["teacher_ms"][str(self.space.data.resolution)]
        return [b.to_ms(teacher_ms) for b in self.space.parsed_budgets()]

    def check_budgets(self, info: dict) -> None:
        """Fail in one line, before any training, when a budget is below the fastest student."""
        from .selection import search_problem

        problem = search_problem(self.bound, info)
        fastest = problem.min_latency()
        teacher_ms = info["teacher_ms"][str(self.space.data.resolution)]
        for raw, ms in zip(self.space.parsed_budgets(), self.budgets_ms(info)):
            if ms < fastest:
                raise EtaError(
                    f"budget {raw} = {ms:.3f} ms is infeasible: the fastest student of this space takes {fastest:.3f} ms "
                    f"({fastest / teacher_ms:.2f}x the teacher's {teacher_ms:.3f} ms)"
                )

    def phase_pretrain(self, force: bool = False) -> dict:
        from .distill import run_phase1

        if self.done("pretrain") and not force:
            return read_json(self.run.root / "phase1" / "metrics.json")
        if force and (self.run.root / "phase1").exists():
            shutil.rmtree(self.run.root / "phase1")
        self._ensure_teacher()
        t0 = time.time()
        with self._ray_session(), self.tracker("pretrain") as tr:
            metrics = run_phase1(self.run, self.bound, self.teacher_path, tracker=tr, progress=self.progress)
            tr.summary(phase1_wall_s=time.time() - t0)
        self._finish("pretrain", wall_s=time.time() - t0)
        return metrics

    def phase_solve(self, force: bool = False) -> dict:
        from .distill import load_block_states
        from .selection import run_phase2

        path = self.run.root / "phase2" / "solutions.json"
        if self.done("solve") and not force:
            return {"solutions": read_json(path), "predictor": read_json(self.run.root / "phase2" / "predictor.json")}
        if force and (self.run.root / "phase2").exists():  # a rerun evaluates and solves afresh
            shutil.rmtree(self.run.root / "phase2")
        self._ensure_teacher()
        info = self.phase_latency()
        states = load_block_states(self.run, self.bound)
        t0 = time.time()
        with self._ray_session(), self.tracker("solve") as tr:
            out = run_phase2(self.run, self.bound, states, info, self.budgets_ms(info), self.splits, tracker=tr, progress=self.progress)
        self._finish("solve", wall_s=time.time() - t0, spearman=out["predictor"]["spearman_holdout"])
        return out

    def selected_archs(self) -> list[str]:
        rows = read_json(self.run.root / "phase2" / "solutions.json")
        archs = []
        for r in sorted(rows, key=lambda r: (r["rank"], r["budget_ms"])):
            if r["arch"] not in archs:
                archs.append(r["arch"])
        return archs[: self.space.phase3.max_students]

    def phase_finetune(self, force: bool = False) -> dict:
        from .arch import arch_from_str
        from .finetune import run_phase3, student_id
        from .pareto import FRONT_COLUMNS, pareto_front, plot_front
        from .selection import search_problem

        if self.done("finetune") and not force:
            return read_json(self.run.root / "pareto.json")
        if force and (self.run.root / "phase3").exists():
            shutil.rmtree(self.run.root / "phase3")
        self._ensure_teacher()
        info = self.phase_latency()
        archs = self.selected_archs()
        t0 = time.time()
        with self._ray_session():
            results = run_phase3(self.run, self.bound, archs, self.teacher_path, wandb_mode=self.space.tracking.wandb,
                                 wandb_project=self.space.tracking.project, progress=self.progress)
        with self._latency_session():
            _, table, executor = self.latency_backend()
            lats = [self.measure_network_all_resolutions(table, arch_from_str(a), executor) for a in archs]
        problem = search_problem(self.bound, info)
        points = []
        for arch_str, m, lat in zip(archs, results, lats):
            arch = arch_from_str(arch_str)
            predicted = problem.latency(self.bound.choices(arch))
            for r in self.space.resolutions:
                points.append({
                    "id": student_id(arch_str), "arch": arch_str, "bits": [op.bits for op in arch], "resolution": int(r),
                    "latency_ms": lat[str(r)], "predicted_latency_ms": predicted if r == self.space.data.resolution else None,
                    "test_acc": m["test_acc"][str(r)], "params": m["params"], "size_mb": m["size_mb"],
                    "bops_g": m["bops"] * (r / self.space.data.resolution) ** 2 / 1e9,
                    "weights": str(Path("phase3") / student_id(arch_str) / "weights.safetensors"),
                })
        teacher_acc = self.run.phase_info("teacher")["test_acc"]
        teacher_pts = [{"resolution": int(r), "latency_ms": info["teacher_ms"][str(r)], "test_acc": teacher_acc[str(r)]} for r in self.space.resolutions]
        front = pareto_front(points)
        out = {"run": self.run.root.name, "device": info["device"], "backend": info["backend"], "target": info["target"],
               "teacher": {"model": self.space.teacher.model, "points": teacher_pts}, "front": front, "all": points,
               "finetune_s": time.time() - t0}
        write_json(self.run.root / "pareto.json", out)
        plot_front(points, front, teacher_pts, self.run.root / "pareto.png",
                   f"{self.run.root.name}: measured latency ({info['backend']}, {info['device']}) vs test accuracy")
        with self.tracker("finetune") as tr:
            cols = [k for k, _, _ in FRONT_COLUMNS]
            tr.table("pareto/front", cols, [[p.get(k) for k in cols] for p in front])
            tr.image("pareto/plot", self.run.root / "pareto.png")
            for sid in dict.fromkeys(p["id"] for p in front):  # one artifact per selected student, its front points as metadata
                pts = [p for p in front if p["id"] == sid]
                tr.artifact(f"{self.run.root.name}-{sid}", "model", [self.run.root / "phase3" / sid],
                            metadata={"arch": pts[0]["arch"], "bits": pts[0]["bits"], "device": info["device"],
                                      "points": [{k: p[k] for k in ("resolution", "latency_ms", "test_acc")} for p in pts]})
        self._finish("finetune", students=len(archs), front=len(front))
        log.info("phase 3: %d students finetuned, %d points on the front", len(archs), len(front))
        return out

    def _ensure_teacher(self) -> None:
        if not self.done("teacher"):
            self.phase_teacher()
        else:
            self.bound.load_teacher_weights(self.teacher_path)
