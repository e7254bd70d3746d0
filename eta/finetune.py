"""Phase 3: finetune the selected students end to end, with elastic resolution, as Ray Tune trials.

Each student starts from its stitched phase-1 operators and is trained on distillation from the
teacher's logits plus cross-entropy, progressively over increasing input sizes so that one set of
weights serves every resolution of the space (table 14.5). Test accuracy is then measured at each
resolution on the held-out test split, and latency by compiling the whole student for the target.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from .arch import arch_from_str
from .bound import BoundSpace, bound_with_teacher, splits_for
from .runs import Run, load_tensors, read_json, save_tensors, write_json
from .space import parse_space
from .student import OperatorBank, bops, count_params, is_quantized, size_mb, skeleton
from .train import evaluate, fit

log = logging.getLogger(__name__)


def student_id(arch_str: str) -> str:
    return "s_" + hashlib.sha1(arch_str.encode()).hexdigest()[:10]


def finetune_student(bound: BoundSpace, bank: OperatorBank, splits, arch, *, device="cpu", on_epoch=None, progress=False):
    """Finetune one stitched student; returns (model, history, test accuracy per resolution)."""
    space = bound.space
    cfg = space.phase3
    student = bank.stitch(arch).to(device)
    if is_quantized(arch):  # quantization-aware training: the fake-quant student computes what the integer module will
        from .mixed_precision import quantize_stitched

        student = quantize_stitched(bound, student, arch, splits, device=device)
    history = fit(
        student,
        splits.train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        resolutions=space.resolutions,
        teacher=bound.teacher,
        kd_weight=cfg.kd_weight,
        temperature=cfg.temperature,
        seed=space.seed,
        device=device,
        on_epoch=on_epoch,
        desc="phase 3",
        progress=progress,
    )
    accs = {int(r): evaluate(student, splits.test, resolution=r, device=device) for r in space.resolutions}
    return student, history, accs


def _finetune_trial(config: dict) -> None:
    """Ray Tune trainable: one selected student, reported per epoch, saved into the run."""
    from ray import tune

    use_gpu = torch.cuda.is_available() and config["num_gpus"] > 0
    device = "cuda" if use_gpu else "cpu"
    torch.set_num_threads(max(1, int(config["num_cpus"])))
    space = parse_space(config["space"])
    run = Run(Path(config["run_root"]))
    splits = splits_for(space)
    bound = bound_with_teacher(space, splits, load_tensors(config["teacher_path"]))
    from .distill import load_block_states

    bank = OperatorBank.from_states(bound, load_block_states(run, bound))
    arch = arch_from_str(config["arch"])
    sid = student_id(config["arch"])
    from .tracking import PhaseTracker

    tracker = PhaseTracker(run.root, f"finetune-{sid}", mode=config["wandb"], project=config["wandb_project"], config={"arch": config["arch"], **space.phase3.model_dump()})
    t0 = time.time()

    def on_epoch(epoch, m):
        tracker.log({f"phase3/{k}": v for k, v in m.items()})
        tune.report({**m, "sid": sid})
        if epoch == 0:
            from .faults import maybe_die

            maybe_die("finetune", sid, config.get("fault"))

    student, history, accs = finetune_student(bound, bank, splits, arch, device=device, on_epoch=on_epoch)
    out = run.dir(f"phase3/{sid}")
    student = student.cpu().eval()
    save_tensors(out / "weights.safetensors", student.state_dict(), {"arch": config["arch"]})
    res = space.data.resolution
    metrics = {
        "id": sid,
        "arch": config["arch"],
        "test_acc": {str(r): a for r, a in accs.items()},
        "history": history,
        "params": count_params(student),
        "size_mb": size_mb(student, arch),
        "bops": bops(skeleton(bound, arch), arch, bound.input_shape(res)),  # MACs of the float tree (quantized convs are folded)
        "finetune_s": time.time() - t0,
    }
    write_json(out / "metrics.json", metrics)
    tracker.summary(**{f"test_acc@{r}": a for r, a in accs.items()})
    tracker.finish()
    tune.report({"done": True, "sid": sid, **{f"test_acc_{r}": a for r, a in accs.items()}})


def run_phase3(run: Run, bound: BoundSpace, archs: list[str], teacher_path: Path, *, wandb_mode: str, wandb_project: str, progress=True) -> list[dict]:
    """Finetune every architecture without a finished ``phase3/<id>/metrics.json`` as Tune trials."""
    from ray import tune

    from . import faults

    cfg = bound.space.phase3
    todo = [a for a in archs if not (run.root / "phase3" / student_id(a) / "metrics.json").exists()]
    if len(todo) < len(archs):
        log.info("phase 3: %d of %d students already finetuned, %d to finetune", len(archs) - len(todo), len(archs), len(todo))
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="phase 3 (finetune trials)", disable=not progress, dynamic_ncols=True)

        class _Progress(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                bar.update(1)

        trainable = tune.with_resources(_finetune_trial, {"cpu": cfg.num_cpus, "gpu": cfg.num_gpus})
        tuner = tune.Tuner(
            trainable,
            param_space={
                "arch": tune.grid_search(todo),
                "space": bound.space.to_dict(),
                "run_root": str(run.root.resolve()),
                "teacher_path": str(Path(teacher_path).resolve()),
                "num_cpus": cfg.num_cpus,
                "num_gpus": cfg.num_gpus,
                "wandb": wandb_mode,
                "wandb_project": wandb_project,
                "fault": faults.spec(),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=None, reuse_actors=False),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str((run.root / "phase3").resolve()),
                verbose=0,
                callbacks=[_Progress()],
                failure_config=tune.FailureConfig(max_failures=2),
            ),
        )
        results = tuner.fit()
        bar.close()
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} finetune trial(s) failed; first: {errors[0]}")
    return [read_json(run.root / "phase3" / student_id(a) / "metrics.json") for a in archs]
