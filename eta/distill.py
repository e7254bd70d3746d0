"""Phase 1: every candidate operator of every block learns to imitate that block (eq. 14.1).

For a group of blocks, one teacher forward per batch yields each block's input and output; every
super-operator of those blocks maps the teacher's input to a prediction of the teacher's output
and is trained by MSE. With elastic width, each step trains a random prefix of the super-operator's
hidden channels, re-ranked by importance every ``sort_every`` steps, so every narrower variant is
a slice. Blocks are independent, so each group of blocks is one Ray task; a finished block is
written at once and never trained again on resume.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .bound import BoundSpace, bound_with_teacher, set_seed, splits_for
from .data import batches, num_batches
from .runs import Run, load_tensors, save_tensors, write_json
from .space import parse_space
from .student import block_super_ops
from .teachers import features_at_blocks

log = logging.getLogger(__name__)


def block_path(phase1_dir: Path, block: int) -> Path:
    return Path(phase1_dir) / f"block_{block:02d}.safetensors"


def pretrain_group(bound: BoundSpace, splits, blocks: list[int], *, seed: int = 0, device="cpu", progress: bool = False) -> dict:
    """Distil every candidate of ``blocks``; returns {block: (state_dict, metrics)}."""
    cfg = bound.space.phase1
    # each block has its own seed and generator, so its weights do not depend on which blocks share its
    # task (groups follow timed costs, the cluster's size, and what a resumed run still has to do)
    gens, ops = {}, {}
    for b in blocks:
        gens[b] = set_seed(seed + 7919 * b)
        ops[b] = block_super_ops(bound, b, cfg.elastic).to(device, memory_format=torch.channels_last)
    trainable = [b for b in blocks if len(ops[b])]
    params = [p for b in trainable for p in ops[b].parameters()]
    if not params:
        return {b: ({}, {"candidates": {}}) for b in blocks}
    teacher = bound.split.to(device, memory_format=torch.channels_last).eval()
    opt = create_optimizer_v2(params, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = num_batches(splits.train, cfg.batch_size, drop_last=True) or 1
    total = steps_per_epoch * cfg.epochs
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=cfg.lr * 0.02, t_in_epochs=False)
    res = bound.space.data.resolution
    history = {b: [] for b in trainable}
    step = 0
    bar = tqdm(total=total, desc=f"phase 1 blocks {blocks}", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        for x, _ in batches(splits.train, cfg.batch_size, resolution=res, shuffle=True, seed=seed * 1000 + epoch, drop_last=True, device=device):
            if step % cfg.sort_every == 0:
                for b in trainable:
                    for op in ops[b].values():
                        op.sort_channels(optimizer=opt)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                feats = features_at_blocks(teacher, x, trainable)  # one teacher forward for the whole group
            loss = 0.0
            for b in trainable:
                t_in, t_out = feats[b]
                block_loss = 0.0
                for op in ops[b].values():
                    op.train()
                    e = op.sample_expansion(gens[b]) if cfg.elastic else None
                    block_loss = block_loss + F.mse_loss(op(t_in, e), t_out)
                history[b].append(block_loss.item() / len(ops[b]))
                loss = loss + block_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            bar.update(1)
    bar.close()
    for b in trainable:
        for op in ops[b].values():
            op.sort_channels(optimizer=opt)
    out = {}
    for b in blocks:
        metrics = {"candidates": evaluate_block(bound, b, ops[b], splits, device=device) if b in trainable else {}}
        if b in trainable:
            h = history[b]
            k = max(1, len(h) // 10)
            metrics["loss_first"] = float(np.mean(h[:k]))
            metrics["loss_last"] = float(np.mean(h[-k:]))
        out[b] = ({k: v.detach().cpu() for k, v in ops[b].state_dict().items()}, metrics)
    return out


@torch.no_grad()
def evaluate_block(bound: BoundSpace, block: int, ops, splits, *, device="cpu", max_batches: int = 4) -> dict:
    """Relative MSE (MSE / teacher output variance) of every candidate on the proxy set, unseen in training."""
    from .student import super_key

    res = bound.space.data.resolution
    elastic = bound.space.phase1.elastic
    errs: dict[str, list[float]] = {}
    for i, (x, _) in enumerate(batches(splits.proxy, 64, resolution=res, device=device)):
        if i >= max_batches:
            break
        t_in, t_out = features_at_blocks(bound.split, x, [block])[block]
        var = t_out.var().clamp_min(1e-12)
        for spec in bound.trainable_specs(block):
            op = ops[super_key(spec, elastic)].eval()
            pred = op(t_in, spec.expansion) if elastic else op(t_in)
            errs.setdefault(str(spec), []).append(float(F.mse_loss(pred, t_out) / var))
    return {k: float(np.mean(v)) for k, v in errs.items()}


def _remote_pretrain_group(space_dict: dict, teacher_state: dict, blocks: list[int], seed: int, use_gpu: bool, fault: str | None = None):
    """Ray task body: rebuild everything from plain data so it runs on any node (and again, when retried)."""
    import ray

    from .faults import maybe_die

    torch.set_num_threads(1 if not use_gpu else torch.get_num_threads())
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    space = parse_space(space_dict)
    splits = splits_for(space)
    bound = bound_with_teacher(space, splits, teacher_state)
    t0 = time.time()
    out = pretrain_group(bound, splits, blocks, seed=seed, device=device)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    for b in out:
        out[b][1]["wall_s"] = time.time() - t0
        out[b][1]["node"] = node  # which Ray node trained it (provenance; node failures move blocks)
    maybe_die("pretrain", f"blocks {blocks}", fault)
    return out


def plan_groups(pending: list[int], n_tasks: int, costs: dict[int, float] | None = None) -> list[list[int]]:
    """Split pending blocks into at most ``n_tasks`` groups of about equal cost (one teacher forward serves a group).

    Blocks differ in cost by an order of magnitude (early, high-resolution blocks are the dearest),
    so groups of equal *count* leave workers idle. Greedy longest-first: each block, dearest first,
    joins the group with the least cost so far. Without costs, blocks count equally.
    """
    n = max(1, min(n_tasks, len(pending)))
    costs = costs or {b: 1.0 for b in pending}
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for b in sorted(pending, key=lambda b: (-costs.get(b, 1.0), b)):
        i = int(np.argmin(load))
        groups[i].append(int(b))
        load[i] += costs.get(b, 1.0)
    return [sorted(g) for g in sorted(groups, key=lambda g: g[0] if g else 0) if g]


def block_costs(bound: BoundSpace, blocks: list[int], batch: int = 32, reps: int = 2) -> dict[int, float]:
    """Seconds of one training step of each block's super-operators, timed here on one thread.

    Measured rather than counted: per multiply-accumulate, early high-resolution blocks with few
    channels cost several times what later ones do on a CPU, so MACs balance groups poorly.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for b in blocks:
            ops = block_super_ops(bound, b, bound.space.phase1.elastic).train()
            if not len(ops):  # nothing to train (identity or teacher only)
                out[b] = 0.0
                continue
            x = torch.randn(batch, *bound.shapes[b][0])
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                sum(op(x).float().square().mean() for op in ops.values()).backward()
                best = min(best, time.perf_counter() - t0)
            out[b] = best
    finally:
        torch.set_num_threads(threads)
    return out


def run_phase1(run: Run, bound: BoundSpace, teacher_path: Path, tracker=None, progress: bool = True) -> dict:
    """Pretrain all blocks not yet on disk, as Ray tasks; returns per-block metrics."""
    import ray

    from . import faults
    from .raycluster import cpu_slots

    space = bound.space
    cfg = space.phase1
    out_dir = run.dir("phase1")
    metrics_path = out_dir / "metrics.json"
    metrics = {}
    if metrics_path.exists():
        from .runs import read_json

        metrics = read_json(metrics_path)
    pending = [b for b in range(bound.num_blocks) if not (block_path(out_dir, b).exists() and str(b) in metrics)]
    if not pending:
        log.info("phase 1: all %d blocks already pretrained", bound.num_blocks)
        return metrics
    n_tasks = cfg.tasks or cpu_slots(cfg.num_cpus)
    groups = plan_groups(pending, n_tasks, block_costs(bound, pending))
    log.info("phase 1: %d blocks in %d Ray tasks (elastic width %s); %d already on disk", len(pending), len(groups),
             "on" if cfg.elastic else "off", bound.num_blocks - len(pending))
    teacher_ref = ray.put({k: v.cpu() for k, v in bound.teacher.state_dict().items()})
    task = ray.remote(_remote_pretrain_group).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=3, retry_exceptions=False)
    fault = faults.spec()
    refs = {task.remote(space.to_dict(), teacher_ref, g, space.seed, cfg.num_gpus > 0, fault): g for g in groups}
    bar = tqdm(total=len(pending), desc="phase 1 (blocks)", disable=not progress, dynamic_ncols=True)
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        result = ray.get(done[0])
        for b, (state, m) in sorted(result.items()):
            save_tensors(block_path(out_dir, b), state, {"block": b, "space": space.fingerprint()})
            metrics[str(b)] = m
            write_json(metrics_path, metrics)
            if tracker is not None:
                tracker.log({f"phase1/block{b:02d}/{k}": v for k, v in m["candidates"].items()})
                if "loss_last" in m:
                    tracker.log({f"phase1/block{b:02d}/loss_first": m["loss_first"], f"phase1/block{b:02d}/loss_last": m["loss_last"]})
            bar.update(1)
    bar.close()
    if tracker is not None:
        rows = [[int(b), spec, err] for b, m in sorted(metrics.items(), key=lambda t: int(t[0])) for spec, err in m["candidates"].items()]
        tracker.table("phase1/candidates", ["block", "operator", "relative_mse"], rows)
    return metrics


def load_block_states(run: Run, bound: BoundSpace) -> list[dict]:
    d = run.root / "phase1"
    return [load_tensors(block_path(d, b)) if bound.trainable_specs(b) else {} for b in range(bound.num_blocks)]
