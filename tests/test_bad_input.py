"""Bad input costs nothing: every refused input is one line on stderr naming what is wrong, exit code 2,
and the run directory and the latency tables are byte-for-byte as they were.

One parametrised test runs the real command line (``python -m eta.cli``, in a subprocess, from a
temporary folder, with private tables, cache and locks) over a corpus of bad inputs: every section
of the search-space schema, the CLI's arguments, and files on disk (weights, manifests, tables, the
W&B folder) in a finished run copied from ``tests/fixtures/runs/format1`` (a finished tiny digits run
of the previous layout; the copy is migrated once per module). A run of the older format is not an
error: it is migrated and its front printed. SIGTERM and Ctrl-C during a phase stop the command
cleanly (exit 143 / 130, one line saying how to resume), the finished phases stay finished, and the
same command resumes (those two cases are ``slow``: they start Ray and pretrain).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from .conftest import REPO, tiny_space_dict

FIXTURE_RUN = REPO / "tests" / "fixtures" / "runs" / "format1"
RUN = "runs/format1"  # where a case's copy of the finished run lives, relative to the case's folder
SPACE = "s.yaml"
SEARCH = ("search", SPACE, "--runs-dir", "runs", "--no-progress")


# --- what a case starts from ----------------------------------------------------------------------
@dataclass
class Ctx:
    """A case's folder: the command's working directory, holding ``runs/``, ``pred/`` (the latency tables) and inputs."""

    root: Path
    request: pytest.FixtureRequest

    @property
    def run(self) -> Path:
        return self.root / RUN

    @property
    def pred(self) -> Path:
        return self.root / "pred"

    def finished_run(self) -> Path:
        """A copy of the finished (migrated) run at ``runs/format1``."""
        shutil.copytree(self.request.getfixturevalue("finished_run"), self.run)
        return self.run

    def write_space(self, edit: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
        p = self.root / SPACE
        if text is None:
            d = tiny_space_dict()
            if edit:
                edit(d)
            text = yaml.safe_dump(d)
        p.write_text(text)
        return p

    def edit_json(self, rel: str, edit: Callable):
        p = self.root / rel
        data = json.loads(p.read_text())
        out = edit(data)
        p.write_text(json.dumps(data if out is None else out, indent=2))

    def env(self) -> dict:
        shared = self.request.getfixturevalue("shared_dirs")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETA_", "WANDB_"))}
        env.update(ETA_PREDICTORS_DIR=str(self.pred), ETA_CACHE_DIR=str(shared / "cache"), ETA_LOCK_DIR=str(shared / "locks"),
                   WANDB_MODE="offline", WANDB_SILENT="true", RAY_AIR_NEW_OUTPUT="0",
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        return env


def listing(root: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``root``, by relative path.

    A run's ``.lock`` is left out: any process that owns the run records itself there (pid, time);
    it is the lock, not the run's content.
    """
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name == ".lock":
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def eta_cli(ctx: Ctx, args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eta.cli", *args], cwd=ctx.root, env=ctx.env(), capture_output=True, text=True,
                          timeout=timeout)


# --- module fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """The cache (decoded data, compiled modules) and machine-wide locks every case of this module shares."""
    root = tmp_path_factory.mktemp("bad_input_shared")
    (root / "cache").mkdir()
    (root / "locks").mkdir()
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The fixture run of the previous layout, copied once and migrated to the current one (Run.open does)."""
    from eta.runs import FORMAT, Run

    root = tmp_path_factory.mktemp("bad_input_finished") / "format1"
    shutil.copytree(FIXTURE_RUN, root)
    run = Run.open(root)
    assert run.manifest()["format"] == FORMAT
    return root


@pytest.fixture(scope="module")
def table_template(finished_run, tmp_path_factory):
    """(path of the finished run's shared table below ``$ETA_PREDICTORS_DIR/latency``, its provenance on this machine,
    one of its entries): what a table this machine would use for that run holds."""
    from eta.latency.table import LatencyTable
    from eta.phases.latency import measurer
    from eta.runs import Run

    m = measurer(Run(finished_run).space())
    rel = m.table_path(Path("/")).relative_to("/")
    fresh = LatencyTable.open(tmp_path_factory.mktemp("table") / "none.json", backend=m.backend, target=m.target, device=m.device,
                              protocol=m.protocol, schedule=m.schedule)
    key, entry = next(iter(json.loads((finished_run / "latency" / "table.json").read_text())["entries"].items()))
    return rel, fresh.provenance, key, entry


def write_table(ctx: Ctx, median_ms=None, text: str | None = None) -> Path:
    """This machine's shared table of the run, with one entry whose ``median_ms`` is given (or raw ``text``)."""
    rel, provenance, key, entry = ctx.request.getfixturevalue("table_template")
    path = ctx.pred / "latency" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = json.dumps({"format": "eta-latency-table/1", "provenance": provenance, "entries": {key: {**entry, "median_ms": median_ms}},
                           "calibrations": {}, "stale": []}, indent=2)  # NaN is written as NaN, which JSON readers accept
    path.write_text(text)
    return path


# --- the cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    args: tuple  # the command line after ``eta``
    expect: tuple = ()  # fragments the one error line names (field, file, argument)
    setup: Callable[[Ctx], None] | None = None
    kind: str = "error"  # error | migrate | signal
    sig: int = 0


def space(edit, *expect, setup=None, file=True) -> Case:
    """``eta search`` on the tiny space after ``edit(space dict)``; the line names ``expect`` and (a schema error,
    ``file``) the space file. Problems found when the teacher is built name the field only."""
    def prepare(ctx):
        ctx.write_space(edit)
        if setup:
            setup(ctx)
    return Case(SEARCH, (SPACE, *expect) if file else expect, prepare)


def space_text(text: str, *expect) -> Case:
    return Case(SEARCH, (SPACE, *expect), lambda ctx: ctx.write_space(text=text))


def on_run(args, *expect, edit: Callable[[Ctx], None] | None = None) -> Case:
    """A command on a copy of the finished run, after ``edit``."""
    def prepare(ctx):
        ctx.finished_run()
        (ctx.pred / "latency").mkdir(parents=True, exist_ok=True)
        if edit:
            edit(ctx)
    return Case(tuple(args), expect, prepare)


def _set(section: str, **values):
    return lambda d: d[section].update(values)


def _set_in(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {}) if isinstance(d, dict) else d[int(p)]
        d[last] = value
    return edit


def _truncate(rel: str, keep: int = 64):
    def edit(ctx):
        p = ctx.root / rel
        p.write_bytes(p.read_bytes()[:keep])
    return edit


def _checkpoint(make: Callable[[Ctx, Path], None] | None, name: str = "ck.safetensors") -> Callable:
    def setup(ctx):
        if make:
            make(ctx, ctx.root / name)
    return setup


def _pickled_checkpoint(ctx, path):
    import torch

    torch.save({"weight": torch.ones(3)}, path)  # what a user's .pt holds: a pickle (never unpickled by eta)


def _truncated_teacher(ctx, path):
    path.write_bytes((FIXTURE_RUN / "teacher" / "teacher.safetensors").read_bytes()[:200])


def _other_architecture(ctx, path):
    import torch
    from safetensors.torch import save_file

    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))


def _manifest(edit):
    return lambda ctx: ctx.edit_json(f"{RUN}/manifest.json", edit)


def _unfinish_after_latency(ctx):
    """The run with teacher and latency finished, pretrain (and what follows) not started."""
    run = ctx.run
    for d in ("pretrain", "solve", "finetune"):
        shutil.rmtree(run / d, ignore_errors=True)
    for f in ("pareto.json", "pareto.png"):
        (run / f).unlink(missing_ok=True)
    ctx.edit_json(f"{RUN}/manifest.json", lambda m: [m["phases"].pop(p, None) for p in ("pretrain", "solve", "finetune")] and None)


def _ck(value):
    return _set("teacher", checkpoint=value)


E = pytest.param
SLOW = pytest.mark.slow
CASES = [
    # --- the space schema, section by section --------------------------------------------------
    E(space(lambda d: d.pop("name"), "'name'", "Field required"), id="space-name-missing"),
    E(space(lambda d: d.update(name="a/b"), "'name'", "a/b"), id="space-name-with-slash"),
    E(space(lambda d: d.update(name=".."), "'name'", ".."), id="space-name-dotdot", marks=SLOW),
    E(space(lambda d: d.update(seed="abc"), "'seed'"), id="space-seed-not-int"),
    E(space(lambda d: d.pop("teacher"), "'teacher'"), id="space-teacher-missing", marks=SLOW),
    E(space(_set("teacher", model="no_such_model_xyz"), "teacher.model", "no_such_model_xyz", file=False), id="space-teacher-unknown-model"),
    E(space(_set("teacher", kwargs={"nonsense": 1}), "teacher.kwargs", "nonsense", file=False), id="space-teacher-bad-kwargs", marks=SLOW),
    E(space(_set("teacher", blocks=["no.such.block"]), "teacher.blocks", "no.such.block", file=False), id="space-teacher-unknown-block", marks=SLOW),
    E(space(_set("teacher", pretrained="maybe"), "teacher.pretrained"), id="space-teacher-pretrained-not-bool", marks=SLOW),
    E(space(_set_in("teacher.train.epochs", 0), "teacher.train.epochs"), id="space-teacher-train-epochs-zero"),
    E(space(_set_in("teacher.train.amp", "fp8"), "teacher.train.amp"), id="space-teacher-train-amp", marks=SLOW),
    E(space(_ck("missing.safetensors"), "teacher.checkpoint", "missing.safetensors", file=False), id="space-teacher-checkpoint-missing", marks=SLOW),
    E(space(_ck("ck.pt"), "teacher.checkpoint", "ck.pt", "never unpickles", file=False, setup=_checkpoint(_pickled_checkpoint, "ck.pt")),
      id="file-teacher-checkpoint-foreign-pickle"),
    E(space(_ck("ck.safetensors"), "teacher.checkpoint", "ck.safetensors", file=False, setup=_checkpoint(_truncated_teacher)),
      id="file-teacher-checkpoint-truncated", marks=SLOW),
    E(space(_ck("ck.safetensors"), "teacher.checkpoint", "ck.safetensors", "does not match", file=False, setup=_checkpoint(_other_architecture)),
      id="file-teacher-checkpoint-other-architecture"),
    E(space(_set("data", dataset="nonexistent"), "data.dataset", "nonexistent", file=False), id="space-data-unknown-dataset"),
    E(space(_set("data", resolution=2), "data.resolution"), id="space-data-resolution-too-small", marks=SLOW),
    E(space(_set("data", proxy_fraction=0.7), "data.proxy_fraction"), id="space-data-proxy-fraction"),
    E(space(_set("data", augment="extreme"), "data.augment"), id="space-data-augment-preset", marks=SLOW),
    E(space(_set("data", augment={"preset": "light", "shift": 0.9}), "data.augment"), id="space-data-augment-shift", marks=SLOW),
    E(space(lambda d: d.update(pool=[]), "'pool'"), id="space-pool-empty", marks=SLOW),
    E(space(_set_in("pool.0.family", "wavelet"), "pool.0.family", "wavelet"), id="space-pool-unknown-family"),
    E(space(_set_in("pool.0.kernel", [4]), "pool.0.kernel", "4"), id="space-pool-even-kernel"),
    E(space(_set_in("pool.0.expansion", [-1]), "pool.0.expansion", "-1"), id="space-pool-negative-expansion", marks=SLOW),
    E(space(lambda d: d["pool"].append("ir"), "pool.3"), id="space-pool-entry-not-mapping", marks=SLOW),
    E(space(_set_in("pool.0.colour", "red"), "pool.0.colour"), id="space-pool-unknown-key", marks=SLOW),
    E(space(lambda d: d.update(bits=[16]), "'bits", "16"), id="space-bits-unsupported"),
    E(space(lambda d: d.update(resolutions=[0, 16]), "'resolutions", "resolution 0"), id="space-resolutions-zero"),
    E(space(lambda d: d.update(widths=[0.5, 2]), "'widths", "interface width 2"), id="space-widths-above-one"),
    E(space(_set("latency", backend="onnx"), "latency.backend"), id="space-latency-backend", marks=SLOW),
    E(space(_set("latency", target="quantum"), "latency.target", "quantum"), id="space-latency-target"),
    E(space(_set("latency", repeat=1), "latency.repeat"), id="space-latency-repeat", marks=SLOW),
    E(space(_set("latency", node_resource="latency:board", tune={"nodes": "tune:cpu"}), "latency", "tune.nodes", "node_resource"),
      id="space-latency-tune-nodes-and-measuring-node", marks=SLOW),
    E(space(lambda d: d.update(budgets=[]), "'budgets'"), id="space-budgets-empty", marks=SLOW),
    E(space(lambda d: d.update(budgets=[2.0]), "'budgets", "2.0"), id="space-budgets-fraction-out-of-range"),
    E(space(lambda d: d.update(budgets=["fast"]), "'budgets", "fast"), id="space-budgets-not-a-budget", marks=SLOW),
    E(space(_set("pretrain", epochs=0), "pretrain.epochs"), id="space-pretrain-epochs-zero"),
    E(space(_set("pretrain", num_gpus=-1), "pretrain.num_gpus"), id="space-pretrain-negative-gpus", marks=SLOW),
    E(space(_set("solve", samples=5), "solve.samples"), id="space-solve-samples"),
    E(space(_set_in("solve.predictor.layers", 1), "solve.predictor.layers"), id="space-solve-predictor-layers", marks=SLOW),
    E(space(_set("finetune", kd_weight=2), "finetune.kd_weight"), id="space-finetune-kd-weight"),
    E(space(_set("finetune", amp="fp8"), "finetune.amp"), id="space-finetune-amp", marks=SLOW),
    E(space(_set("tracking", wandb="cloud"), "tracking.wandb"), id="space-tracking-wandb"),
    E(space(_set("tracking", project=5), "tracking.project"), id="space-tracking-project-not-str", marks=SLOW),
    E(space(lambda d: d.update(colour="red"), "'colour'"), id="space-unknown-top-level-key"),
    E(space(lambda d: d.update(phase1=d["pretrain"]), "phase1", "pretrain"), id="space-legacy-and-new-section", marks=SLOW),
    E(space_text("name: [unclosed\n", "malformed YAML"), id="space-malformed-yaml"),
    E(space_text("- name: tiny\n- seed: 0\n", "mapping", "list"), id="space-yaml-list"),
    E(space_text("", "mapping"), id="space-yaml-empty", marks=SLOW),
    E(space_text("!!python/object/apply:os.system ['touch pwned']\n", "malformed YAML"), id="space-yaml-python-tag-not-executed"),
    E(Case(("search", "nowhere.yaml", "--runs-dir", "runs"), ("nowhere.yaml",)), id="space-file-missing", marks=SLOW),
    # --- the command line ----------------------------------------------------------------------
    E(Case(("pareto", "runs/nowhere"), ("runs/nowhere",)), id="cli-pareto-unknown-run"),
    E(Case(("export", "runs/nowhere", "-o", "out"), ("runs/nowhere",)), id="cli-export-unknown-run"),
    E(Case(("solve", "runs/nowhere"), ("runs/nowhere",)), id="cli-solve-unknown-run"),
    E(Case(("frobnicate",), ("frobnicate",)), id="cli-unknown-command"),
    E(Case((*SEARCH, "--bogus"), ("--bogus",), lambda ctx: ctx.write_space()), id="cli-unknown-flag"),
    E(Case((*SEARCH, "--num-cpus", "two"), ("--num-cpus", "two"), lambda ctx: ctx.write_space()), id="cli-flag-bad-int"),
    E(Case((*SEARCH, "--wandb", "sometimes"), ("--wandb", "sometimes"), lambda ctx: ctx.write_space()), id="cli-flag-bad-choice"),
    E(Case(("export", RUN), ("-o/--output",)), id="cli-export-without-output"),
    E(Case((*SEARCH, "--name", "a/b"), ("--name", "a/b"), lambda ctx: ctx.write_space()), id="cli-name-with-slash"),
    E(Case((*SEARCH, "--name", ".."), ("--name", "'..'"), lambda ctx: ctx.write_space()), id="cli-name-dotdot"),
    E(Case((*SEARCH, "--budgets", "fast"), ("budgets", "fast"), lambda ctx: ctx.write_space()), id="cli-budgets-not-a-budget", marks=SLOW),
    E(on_run(("search", RUN, "--budgets", "0.5"), "--budgets"), id="cli-budgets-on-existing-run"),
    E(on_run(("latency", "build", RUN, "--backend", "torch"), "--backend"), id="cli-backend-on-existing-run", marks=SLOW),
    E(on_run(("latency", "validate", RUN, "--students", "2"), "--students"), id="cli-validate-too-few-students"),
    E(on_run(("export", RUN, "-o", "out"), "out", "--force", edit=lambda ctx: (ctx.root / "out").mkdir() or
             (ctx.root / "out" / "keep.txt").write_text("mine")), id="cli-export-non-empty-folder"),
    E(on_run(("export", RUN, "-o", "out", "--max-latency-ms", "0.001"), "0.001 ms", "fastest"), id="cli-export-below-fastest"),
    E(on_run(("export", RUN, "-o", "out", "--int"), "--int"), id="cli-export-int-of-float-student"),
    E(on_run(("export", RUN, "-o", "out", "--resolution", "99"), "resolution 99"), id="cli-export-unknown-resolution", marks=SLOW),
    E(on_run(("search", "other.yaml", "--runs-dir", "runs", "--no-progress"), RUN, "--force",
             edit=lambda ctx: (ctx.root / "other.yaml").write_text((ctx.run / "space.yaml").read_text().replace(
                 "sort_every: 10", "sort_every: 11"))), id="cli-existing-run-other-space-without-force", marks=SLOW),
    # --- files on disk -------------------------------------------------------------------------
    E(on_run(("search", RUN, "--no-progress"), "teacher.safetensors", edit=_truncate(f"{RUN}/teacher/teacher.safetensors")),
      id="file-run-teacher-truncated"),
    E(on_run(("solve", RUN, "--rerun", "--no-progress"), "pretrain/block_00.safetensors",
             edit=_truncate(f"{RUN}/pretrain/block_00.safetensors")), id="file-block-truncated"),
    E(on_run(("solve", RUN, "--rerun", "--no-progress"), "pretrain/block_00.safetensors",
             edit=lambda ctx: (ctx.run / "pretrain" / "block_00.safetensors").unlink()), id="file-block-missing"),
    E(on_run(("solve", RUN, "--rerun", "--no-progress"), "pretrain/block_00.safetensors",
             edit=lambda ctx: (ctx.run / "pretrain" / "block_00.safetensors").write_text("these are not weights\n")),
      id="file-block-foreign", marks=SLOW),
    E(on_run(("finetune", RUN, "--rerun", "--no-progress"), "pretrain/block_00.safetensors", "block 0",
             edit=lambda ctx: shutil.copyfile(ctx.run / "pretrain" / "block_01.safetensors", ctx.run / "pretrain" / "block_00.safetensors")),
      id="file-block-of-another-block", marks=SLOW),
    E(on_run(("pareto", RUN), "manifest.json", edit=lambda ctx: (ctx.run / "manifest.json").write_text('{"name": "format1", "pha')),
      id="file-manifest-invalid-json"),
    E(on_run(("pareto", RUN), "manifest.json", edit=_manifest(lambda m: ["format1"])), id="file-manifest-not-an-object"),
    E(on_run(("pareto", RUN), "manifest.json", "phases.teacher", edit=_manifest(lambda m: m["phases"].update(teacher="done"))),
      id="file-manifest-phase-not-an-object"),
    E(on_run(("pareto", RUN), "manifest.json", "'format'", edit=_manifest(lambda m: m.update(format="two"))),
      id="file-manifest-format-not-int", marks=SLOW),
    E(on_run(("pareto", RUN), "manifest.json", "newer eta", edit=_manifest(lambda m: m.update(format=99))),
      id="file-manifest-format-from-newer-eta", marks=SLOW),
    E(on_run(("pareto", RUN), "pareto.json", edit=_truncate(f"{RUN}/pareto.json", 100)), id="file-pareto-truncated", marks=SLOW),
    E(on_run(("pareto", RUN), "pareto.json", edit=lambda ctx: ctx.edit_json(f"{RUN}/pareto.json", lambda p: p.pop("teacher") and None)),
      id="file-pareto-without-teacher", marks=SLOW),
    E(on_run(("search", RUN, "--no-progress"), "latency/latency.json", edit=_truncate(f"{RUN}/latency/latency.json", 100)),
      id="file-latency-record-truncated", marks=SLOW),
    E(on_run(("search", RUN, "--no-progress"), "latency/latency.json", "object",
             edit=lambda ctx: (ctx.run / "latency" / "latency.json").write_text("[1, 2]\n")), id="file-latency-record-not-an-object", marks=SLOW),
    E(on_run(("search", RUN, "--no-progress"), "pareto.json", "Pareto front",
             edit=lambda ctx: (ctx.run / "pareto.json").write_text('{"run": "format1", "front": 3}\n')), id="file-pareto-front-not-a-list",
      marks=SLOW),
    E(on_run(("finetune", RUN, "--rerun", "--no-progress"), "solve/solutions.json",
             edit=lambda ctx: (ctx.run / "solve" / "solutions.json").write_text('{"rows": "none"}\n')), id="file-solutions-not-a-list",
      marks=SLOW),
    E(on_run(("search", RUN, "--no-progress"), "space.yaml", "pretrain.epochs",
             edit=lambda ctx: (ctx.run / "space.yaml").write_text((ctx.run / "space.yaml").read_text().replace(
                 "  epochs: 1\n  lr: 0.002", "  epochs: 0\n  lr: 0.002"))), id="file-run-space-edited-invalid", marks=SLOW),
    E(on_run(("export", RUN, "-o", "out"), "weights.safetensors",
             edit=lambda ctx: _truncate(next(str(p.relative_to(ctx.root)) for p in ctx.run.glob("finetune/*/weights.safetensors")))(ctx)),
      id="file-student-weights-truncated", marks=SLOW),
    E(on_run(("latency", "build", RUN, "--rerun", "--no-progress"), "latency table", "median_ms", "nan",
             edit=lambda ctx: write_table(ctx, float("nan"))), id="file-table-nan-entry"),
    E(on_run(("latency", "build", RUN, "--rerun", "--no-progress"), "latency table", "median_ms", "-1.0",
             edit=lambda ctx: write_table(ctx, -1.0)), id="file-table-negative-entry"),
    E(on_run(("latency", "build", RUN, "--rerun", "--no-progress"), "latency table", "median_ms", "'fast'",
             edit=lambda ctx: write_table(ctx, "fast")), id="file-table-string-entry"),
    E(on_run(("latency", "build", RUN, "--rerun", "--no-progress"), "corrupt latency table",
             edit=lambda ctx: write_table(ctx, text='{"format": "eta-latency-table/1", "entr')), id="file-table-invalid-json", marks=SLOW),
    E(on_run(("solve", RUN, "--rerun", "--wandb", "offline", "--no-progress"), "W&B", f"{RUN}/wandb",
             edit=lambda ctx: (ctx.run / "wandb").write_text("a file where the W&B folder goes\n")), id="file-wandb-dir-is-a-file"),
    # --- not errors: a run of the older format resumes; signals stop cleanly and resume ---------
    E(Case(("pareto", RUN), ("Pareto front of format1",), lambda ctx: shutil.copytree(FIXTURE_RUN, ctx.run), kind="migrate"),
      id="older-format-run-migrated"),
    E(Case(("pretrain", RUN, "--no-progress"), ("terminated",), kind="signal", sig=signal.SIGTERM), marks=SLOW,
      id="signal-sigterm-mid-pretrain"),
    E(Case(("pretrain", RUN, "--no-progress"), ("interrupted",), kind="signal", sig=signal.SIGINT), marks=SLOW,
      id="signal-sigint-mid-pretrain"),
]


def _eta_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("eta:")]


def _until_phase_runs(ctx: Ctx, args, sig: int, marker: str = "Ray tasks", timeout: float = 240) -> tuple[int, str]:
    """Start ``eta args``, send ``sig`` once the phase's work has started (its log says ``marker``); (exit code, stderr)."""
    # as a foreground command gets Ctrl-C: a suite started as a shell's background job passes SIGINT on ignored
    proc = subprocess.Popen([sys.executable, "-m", "eta.cli", *args], cwd=ctx.root, env=ctx.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout), "".join(lines)[-3000:]
        time.sleep(1.0)  # inside the phase's work, not at its first line
        proc.send_signal(sig)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    proc.stdout.close()
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, tmp_path, request):
    ctx = Ctx(tmp_path, request)
    (ctx.pred / "latency").mkdir(parents=True)
    if case.setup:
        case.setup(ctx)

    if case.kind == "migrate":  # a finished run of the older layout: migrated, and its front printed
        r = eta_cli(ctx, case.args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert all(e in r.stdout for e in case.expect), r.stdout
        manifest = json.loads((ctx.run / "manifest.json").read_text())
        from eta.runs import FORMAT, PHASES

        assert manifest["format"] == FORMAT and all(manifest["phases"][p]["status"] == "done" for p in PHASES)
        assert (ctx.run / "finetune").is_dir() and not (ctx.run / "phase3").exists()
        return

    if case.kind == "signal":  # stopped mid-phase: exit 128 + signal, one line, finished phases kept; the same command resumes
        ctx.finished_run()
        _unfinish_after_latency(ctx)
        finished = {k: v for k, v in listing(ctx.run).items() if k.startswith(("teacher", "latency"))}
        code, stderr = _until_phase_runs(ctx, case.args, case.sig)
        assert code == 128 + case.sig, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = _eta_lines(stderr)
        assert len(lines) == 1 and all(e in lines[0] for e in case.expect) and "run the same command again to resume" in lines[0], lines
        phases = json.loads((ctx.run / "manifest.json").read_text())["phases"]
        assert phases["teacher"]["status"] == "done" and phases["latency"]["status"] == "done" and "pretrain" not in phases
        assert {k: v for k, v in listing(ctx.run).items() if k.startswith(("teacher", "latency"))} == finished
        again = eta_cli(ctx, case.args, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "finished: teacher, latency" in again.stderr, again.stderr[-3000:]
        phases = json.loads((ctx.run / "manifest.json").read_text())["phases"]
        assert phases["pretrain"]["status"] == "done"
        assert {k: v for k, v in listing(ctx.run).items() if k.startswith(("teacher", "latency"))} == finished
        return

    before = listing(ctx.root)
    r = eta_cli(ctx, case.args)
    after = listing(ctx.root)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("eta: error:")]
    assert len(errors) == 1 and len(_eta_lines(r.stderr)) == 1, r.stderr[-3000:]
    missing = [e for e in case.expect if e not in errors[0]]
    assert not missing, f"{errors[0]!r} does not name {missing}"
    assert digest(after) == digest(before), f"changed on disk: {changed(before, after)}"
    assert not (ctx.root / "pwned").exists()  # YAML is safe-loaded: nothing in a space executes
