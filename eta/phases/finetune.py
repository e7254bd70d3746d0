"""Phase ``finetune``: the selected students trained end to end with elastic resolution, measured, and the front.

Each student starts from its stitched pretrained operators and is trained on distillation from the
teacher's logits plus cross-entropy, progressively over increasing input sizes so that one set of
weights serves every resolution of the space (table 14.5), as one Ray Tune trial. Test accuracy
is then measured at each resolution on the held-out test split, and latency by compiling the
whole student for the target; the Pareto front over (architecture, bits, resolution) is kept.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from .. import faults, threads
from ..arch import arch_from_str
from ..bound import BoundSpace, rebuild
from ..augment import for_space
from ..devices import pick_device
from ..errors import EtaError
from ..files import load_tensors, read_json, save_tensors, write_json
from ..mixed_precision import quantize_stitched
from ..pareto import FRONT_COLUMNS, pareto_front
from ..plots import plot_front
from ..raycluster import TaskContext
from ..records import Front, FrontPoint, LatencyInfo
from ..runs import Run
from ..student import OperatorBank, bops, count_params, is_quantized, size_mb, skeleton, weights_skeleton
from ..tracking import PhaseTracker
from ..train import evaluate, fit, recalibrate_bn
from . import latency
from .pretrain import load_block_states
from .context import PhaseContext

log = logging.getLogger(__name__)

NAME = "finetune"


def student_id(arch_str: str) -> str:
    return "s_" + hashlib.sha1(arch_str.encode()).hexdigest()[:10]


def is_finetuned(run: Run, arch_str: str, space) -> bool:
    """A finished student of the space's finetune recipe (students saved before recipes were recorded count as its)."""
    path = run.student_metrics(student_id(arch_str))
    current = space.finetune.recipe()
    return path.exists() and read_json(path).get("recipe", current) == current


def finetune_student(bound: BoundSpace, bank: OperatorBank, splits, arch, *, device="cpu", on_epoch=None, progress=False,
                     data_parallel: bool = False):
    """Finetune one stitched student; returns (model, history, test accuracy per resolution).

    ``data_parallel``: this process is one rank of a Ray Train worker group training the student together.
    """
    space = bound.space
    cfg = space.finetune
    student = bank.stitch(arch).to(device)
    if is_quantized(arch):  # quantization-aware training: the fake-quant student computes what the integer module will
        student = quantize_stitched(bound, student, arch, splits, device=device)
    history = fit(student, splits.train, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                  resolutions=space.resolutions, teacher=bound.teacher, kd_weight=cfg.kd_weight, temperature=cfg.temperature,
                  seed=space.seed, device=device, on_epoch=on_epoch, desc="finetune", progress=progress,
                  augment=for_space(space, splits.num_classes), amp="off" if is_quantized(arch) else cfg.amp,
                  data_parallel=data_parallel)
    variants = at_resolutions(bound, splits, student, arch, device=device)
    accs = {r: evaluate(model, splits.test, resolution=r, device=device) for r, model in variants.items()}
    return variants, history, accs


def at_resolutions(bound: BoundSpace, splits, student: torch.nn.Module, arch, *, device="cpu") -> dict[int, torch.nn.Module]:
    """The finetuned student for each resolution of the space: at the largest (trained last) as trained, at each lower
    one with its BatchNorm statistics re-estimated there on training images. One set of weights serves every
    resolution; the statistics of its activations do not (once-for-all does the same for each sub-network)."""
    cfg = bound.space.finetune
    top = max(bound.space.resolutions)
    adapt = cfg.resolution_bn_batches > 0 and not is_quantized(arch) and has_batchnorm(student)
    out = {}
    for r in sorted(int(r) for r in bound.space.resolutions):
        if r == top or not adapt:
            out[r] = student
            continue
        out[r] = copy.deepcopy(student)
        recalibrate_bn(out[r], splits.train, resolution=r, num_batches_=cfg.resolution_bn_batches, batch_size=cfg.batch_size,
                       seed=bound.space.seed, device=device)
    return out


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def save_lower_resolutions(run: Run, sid: str, arch_str: str, variants: dict[int, torch.nn.Module]) -> list[int]:
    """Save the student's weights at each lower resolution with statistics of its own (the largest resolution's are
    the student's own weights file); remove those a setting no longer wants; returns the resolutions saved."""
    top = max(variants)
    own = [r for r, model in variants.items() if r != top and model is not variants[top]]
    for r in variants:
        if r in own:
            save_tensors(run.student_weights(sid, r), variants[r].state_dict(), {"arch": arch_str, "resolution": str(r)})
        elif r != top:
            run.student_weights(sid, r).unlink(missing_ok=True)
    return own


def finetune_trial(config: dict) -> None:
    """Ray Tune trainable: one selected student, reported per epoch, saved into the run.

    With ``finetune.workers`` above one the trial drives a Ray Train run of that many data-parallel
    workers (each with the trial's CPUs and GPUs) instead of training here.
    """
    from ray import tune

    cfg = config["space"]["finetune"]
    if cfg.get("workers", 1) > 1:
        from ..distributed import train_data_parallel

        run = Run(Path(config["run_root"]))
        train_data_parallel(finetune_worker, config, workers=cfg["workers"], cpus_per_worker=cfg.get("num_cpus", 1),
                            gpus_per_worker=cfg.get("num_gpus", 0), storage=run.tune_dir.parent / "train",
                            name=student_id(config["arch"]), in_tune_trial=True)
        return
    config["context"].install()
    train_and_save(config, device=pick_device(config["num_gpus"]), report=tune.report)


def finetune_worker(config: dict) -> None:
    """Ray Train worker loop: one rank of a student trained data-parallel; rank 0 saves it."""
    from ..distributed import report, worker_rank

    config["context"].install()
    rank = worker_rank()
    train_and_save(config, device=rank.device, report=report, rank=rank)


def train_and_save(config: dict, *, device, report, rank=None) -> None:
    """Finetune the trial's student on ``device`` and save it into the run (rank 0 only when data-parallel)."""
    run = Run(Path(config["run_root"]))
    bound, splits = rebuild(config["space"], load_tensors(config["teacher_path"]))
    bank = OperatorBank(bound, load_block_states(run, bound))
    arch = arch_from_str(config["arch"])
    sid = student_id(config["arch"])
    space = bound.space
    leader = rank is None or rank.leader
    tracker = PhaseTracker(run.root, f"finetune-{sid}", mode=config["wandb"] if leader else "disabled",
                           project=config["wandb_project"], config={"arch": config["arch"], **space.finetune.model_dump()})
    t0 = time.time()

    def on_epoch(epoch, m):
        tracker.log({f"finetune/{k}": v for k, v in m.items()})
        report({**m, "sid": sid})
        if epoch == 0 and leader:
            faults.maybe_die(NAME, sid)

    variants, history, accs = finetune_student(bound, bank, splits, arch, device=device, on_epoch=on_epoch,
                                               data_parallel=rank is not None)
    variants = {r: m.cpu().eval() for r, m in variants.items()}
    student = variants[max(variants)]
    if leader:
        save_tensors(run.student_weights(sid), student.state_dict(), {"arch": config["arch"]})
        own = save_lower_resolutions(run, sid, config["arch"], variants)
        metrics = {"id": sid, "arch": config["arch"], "test_acc": {str(r): a for r, a in accs.items()}, "history": history,
                   "bn_resolutions": own, "resolution_bn_batches": space.finetune.resolution_bn_batches,
                   "params": count_params(student), "size_mb": size_mb(student, arch),
                   # MACs of the float tree (quantized convs are folded)
                   "bops": bops(skeleton(bound, arch), arch, bound.input_shape(space.data.resolution)),
                   "finetune_s": time.time() - t0, "workers": 1 if rank is None else rank.world, "recipe": space.finetune.recipe()}
        write_json(run.student_metrics(sid), metrics)
        tracker.summary(**{f"test_acc@{r}": a for r, a in accs.items()})
    tracker.finish()
    # not "done": Tune ends a trial that reports it at once, and a data-parallel trial's Train run died with it before
    # it could free its workers' CPUs
    report({"saved": True, "sid": sid, **{f"test_acc_{r}": a for r, a in accs.items()}})


def still_to_finetune(ctx: PhaseContext, archs: list[str]) -> list[str]:
    """The architectures without weights finetuned under the space's current recipe."""
    return [a for a in archs if not is_finetuned(ctx.run, a, ctx.space)]


def restate_resolutions(ctx: PhaseContext, metrics: list[dict]) -> list[dict]:
    """Students finetuned without per-resolution statistics of the space's ``resolution_bn_batches`` (before eta kept
    them, or under another setting) get them here from their saved weights, and their accuracy below the largest
    resolution is measured again; nothing is trained again."""
    from tqdm.auto import tqdm

    n = ctx.space.finetune.resolution_bn_batches
    stale = [m for m in metrics if m.get("resolution_bn_batches") != n]
    if not stale:
        return metrics
    log.info("finetune: re-estimating BatchNorm statistics below %d px for %d students finetuned without them",
             max(ctx.space.resolutions), len(stale))
    device = pick_device(1)
    for m in tqdm(stale, desc="statistics per resolution", disable=not ctx.progress, dynamic_ncols=True):
        arch = arch_from_str(m["arch"])
        model = weights_skeleton(ctx.bound, arch)
        model.load_state_dict(load_tensors(ctx.run.student_weights(m["id"])))
        variants = at_resolutions(ctx.bound, ctx.splits, model.to(device).eval(), arch, device=device)
        own = save_lower_resolutions(ctx.run, m["id"], m["arch"], {r: v.cpu().eval() for r, v in variants.items()})
        for r in variants:
            if r != max(variants):  # the largest resolution's weights and accuracy are the trained ones, kept
                m["test_acc"][str(r)] = evaluate(variants[r], ctx.splits.test, resolution=r, device=device)
        m.update(bn_resolutions=own, resolution_bn_batches=n)
        write_json(ctx.run.student_metrics(m["id"]), m)
    return metrics


def finetune_all(ctx: PhaseContext, archs: list[str]) -> list[dict]:
    """Finetune every architecture not finetuned yet under the space's recipe as Ray Tune trials."""
    from ray import tune
    from tqdm.auto import tqdm

    cfg = ctx.space.finetune
    todo = still_to_finetune(ctx, archs)
    if len(todo) < len(archs):
        log.info("finetune: %d of %d students already finetuned, %d to finetune", len(archs) - len(todo), len(archs), len(todo))
    again = [a for a in todo if ctx.run.student_metrics(student_id(a)).exists()]
    if again:
        log.info("finetune: %d students were finetuned with other finetune settings; finetuning them again", len(again))
        for a in again:  # a trial that stops half-way must not leave the old recipe's metrics beside new weights
            ctx.run.student_metrics(student_id(a)).unlink()
    if todo:
        bar = tqdm(total=len(todo), desc="finetune (trials)", disable=not ctx.progress, dynamic_ncols=True)

        class _Progress(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                bar.update(1)

        # Data-parallel trials ask Tune for nothing, so Tune would start them all at once and their Train runs would wait
        # on each other's workers (timing out and retrying): no more students start than the cluster holds worker groups.
        concurrent = worker_groups_held(cfg) if cfg.workers > 1 else None
        # a data-parallel trial only drives its Ray Train workers, which hold the CPUs and GPUs themselves
        # (a trial must ask for something: one byte of memory)
        resources = {"cpu": cfg.num_cpus, "gpu": cfg.num_gpus} if cfg.workers == 1 else {"cpu": 0, "memory": 1}
        trainable = tune.with_resources(finetune_trial, resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"arch": tune.grid_search(todo), "space": ctx.space.to_dict(), "run_root": str(ctx.run.root.resolve()),
                         "teacher_path": str(Path(ctx.teacher_path).resolve()),
                         "num_gpus": cfg.num_gpus, "wandb": ctx.space.tracking.wandb, "wandb_project": ctx.space.tracking.project,
                         "context": TaskContext.from_driver(threads=max(1, int(cfg.num_cpus)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=False),
            run_config=tune.RunConfig(name="tune", storage_path=str(ctx.run.tune_dir.parent.resolve()), verbose=0, callbacks=[_Progress()],
                                      failure_config=tune.FailureConfig(max_failures=2)),
        )
        results = tuner.fit()
        bar.close()
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} finetune trial(s) failed; first: {errors[0]}")
    return [read_json(ctx.run.student_metrics(student_id(a))) for a in archs]


def idle_cores(cfg, students: int, ray_cpus: int | None = None) -> int:
    """CPU cores of this machine that finetuning ``students`` leaves to other work (compiling the front), taking
    the local Ray node (``ray_cpus``, default every core, and the visible GPUs) to run as many trials at once as
    it holds; none when it holds none (the trials' cores are then unknown)."""
    if students < 1:
        return threads.idle_cores(0)
    node = ray_cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        at_once = min(students, groups_that_fit(cfg, {"CPU": node, "GPU": gpus}))
    except EtaError:
        return 0
    return threads.idle_cores(min(node, at_once * cfg.workers * cfg.num_cpus))


def groups_that_fit(cfg, have: dict) -> int:
    """How many students' trials (``workers`` x ``num_cpus`` CPUs and ``num_gpus`` GPUs each) ``have`` ({"CPU": n,
    "GPU": m}) holds at once; one line when it cannot hold one."""
    groups = []
    for name, per in (("CPU", cfg.num_cpus), ("GPU", cfg.num_gpus)):
        if per > 0:
            need = cfg.workers * per
            if need > have.get(name, 0) + 1e-9:
                raise EtaError(f"finetune.workers: {cfg.workers} workers of {per:g} {name}(s) each need {need:g} {name}s; "
                               f"the Ray cluster has {have.get(name, 0):g}")
            groups.append(int((have.get(name, 0) + 1e-9) // need))
    return max(1, min(groups, default=1))


def worker_groups_held(cfg) -> int:
    """How many students' worker groups the Ray cluster holds at once; one line, instead of a trial waiting for ever,
    when it cannot hold one."""
    import ray

    return groups_that_fit(cfg, ray.cluster_resources())


def front_points(ctx: PhaseContext, info: LatencyInfo, archs: list[str], metrics: list[dict], latencies: list[dict]) -> list[FrontPoint]:
    """Every finetuned student at every resolution: measured latency and accuracy, size, what the table predicted."""
    space = ctx.space
    problem = latency.search_problem(ctx.bound, info)
    points = []
    for arch_str, m, lat in zip(archs, metrics, latencies):
        arch = arch_from_str(arch_str)
        predicted = problem.latency(ctx.bound.choices(arch))
        sid = student_id(arch_str)
        for r in space.resolutions:
            points.append(FrontPoint(id=sid, arch=arch_str, bits=[op.bits for op in arch], resolution=int(r), latency_ms=lat[str(r)],
                                     predicted_latency_ms=predicted if r == space.data.resolution else None,
                                     test_acc=m["test_acc"][str(r)], params=m["params"], size_mb=m["size_mb"],
                                     bops_g=m["bops"] * (r / space.data.resolution) ** 2 / 1e9,
                                     weights=ctx.run.relative(ctx.run.student_weights(sid, r if r in m.get("bn_resolutions", ()) else None))))
    return points


def load(ctx: PhaseContext) -> dict:
    return read_json(ctx.run.pareto_json)


def run(ctx: PhaseContext, info: LatencyInfo, archs: list[str]) -> tuple[dict, dict]:
    space, run_dir = ctx.space, ctx.run
    t0 = time.time()
    # the front's networks compile while the students finetune (their latency does not depend on the weights), on the
    # cores the trials leave idle; with nothing to finetune there is nothing to overlap, and networks_latency tunes first
    todo = still_to_finetune(ctx, archs)
    if todo:
        latency.compile_networks_ahead(ctx, info, [arch_from_str(a) for a in archs], idle_cores(space.finetune, len(todo), ctx.num_cpus))
    with ctx.ray():
        metrics = finetune_all(ctx, archs)
    metrics = restate_resolutions(ctx, metrics)
    with ctx.latency_session():
        m, table = latency.opened_table(ctx, info)
        executor = m.executor()
        lats = latency.networks_latency(ctx.bound, table, [arch_from_str(a) for a in archs], executor, m, progress=ctx.progress)
    points = [p.to_dict() for p in front_points(ctx, info, archs, metrics, lats)]
    teacher_acc = run_dir.phase_info("teacher")["test_acc"]
    teacher_pts = [{"resolution": int(r), "latency_ms": info.teacher_ms[str(r)], "test_acc": teacher_acc[str(r)]} for r in space.resolutions]
    front = pareto_front(points)
    out = Front(run=run_dir.root.name, device=info.device, backend=info.backend, target=info.target,
                teacher={"model": space.teacher.model, "points": teacher_pts}, front=front, all=points, finetune_s=time.time() - t0).to_dict()
    write_json(run_dir.pareto_json, out)
    plot_front(points, front, teacher_pts, run_dir.pareto_png,
               f"{run_dir.root.name}: measured latency ({info.backend}, {info.device}) vs test accuracy")
    with ctx.tracker(NAME) as tr:
        cols = [k for k, _, _ in FRONT_COLUMNS]
        tr.table("pareto/front", cols, [[p.get(k) for k in cols] for p in front])
        tr.image("pareto/plot", run_dir.pareto_png)
        for sid in dict.fromkeys(p["id"] for p in front):  # one artifact per selected student, its front points as metadata
            pts = [p for p in front if p["id"] == sid]
            tr.artifact(f"{run_dir.root.name}-{sid}", "model", [run_dir.student_dir(sid)],
                        metadata={"arch": pts[0]["arch"], "bits": pts[0]["bits"], "device": info.device,
                                  "points": [{k: p[k] for k in ("resolution", "latency_ms", "test_acc")} for p in pts]})
    log.info("finetune: %d students finetuned, %d points on the front", len(archs), len(front))
    return out, {"students": len(archs), "front": len(front)}
