"""Phase ``pretrain``: every candidate operator of every block learns to imitate that block (eq. 14.1).

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

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .. import faults
from ..bound import BoundSpace, rebuild, set_seed
from ..augment import for_space
from ..data import batches, num_batches
from ..devices import autocast, grad_scaler, optimizer_step, pick_device
from ..elastic import super_op_name
from ..errors import EtaError, first_line
from ..files import load_tensors, read_json, save_tensors, write_json
from ..raycluster import Task, completed, cpu_slots
from ..runs import Run
from ..interfaces import slice_channels
from ..student import HEADS, block_super_ops, narrow_heads, split_heads, width_key
from ..teachers import features_at_blocks
from ..threads import torch_threads
from .context import PhaseContext

log = logging.getLogger(__name__)

NAME = "pretrain"


def pretrain_group(bound: BoundSpace, splits, blocks: list[int], *, seed: int = 0, device="cpu", progress: bool = False) -> dict:
    """Distil every candidate of ``blocks``; returns {block: (state_dict, metrics)}."""
    cfg = bound.space.pretrain
    # each block has its own seed and generator, so its weights do not depend on which blocks share its
    # task (groups follow timed costs, the cluster's size, and what a resumed run still has to do)
    gens, ops = {}, {}
    for b in blocks:
        gens[b] = set_seed(seed + 7919 * b)
        ops[b] = block_super_ops(bound, b, cfg.elastic).to(device, memory_format=torch.channels_last)
    trainable = [b for b in blocks if len(ops[b])]
    last = bound.num_blocks - 1
    heads = narrow_heads(bound).to(device, memory_format=torch.channels_last) if last in blocks else torch.nn.ModuleDict()
    params = [p for b in trainable for p in ops[b].parameters()] + list(heads.parameters())
    if not params:
        return {b: ({}, {"candidates": {}}) for b in blocks}
    teacher = bound.split.to(device, memory_format=torch.channels_last).eval()
    kept = {w: bound.kept_channels(w) or [None] * (bound.num_blocks + 1) for w in bound.widths}
    opt = create_optimizer_v2(params, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = num_batches(splits.train, cfg.batch_size, drop_last=True) or 1
    total = steps_per_epoch * cfg.epochs
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=cfg.lr * 0.02, t_in_epochs=False)
    res = bound.space.data.resolution
    aug = for_space(bound.space, splits.num_classes)
    augment = aug if aug.pretrain else None
    scaler = grad_scaler(device, cfg.amp)
    history = {b: [] for b in trainable}
    step = 0
    bar = tqdm(total=total, desc=f"pretrain blocks {blocks}", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        for x, _ in batches(splits.train, cfg.batch_size, resolution=res, shuffle=True, seed=seed * 1000 + epoch, drop_last=True,
                            device=device, augment=augment):
            if step % cfg.sort_every == 0:
                for b in trainable:
                    for op in ops[b].values():
                        op.sort_channels(optimizer=opt)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.amp):
                with torch.no_grad():  # one teacher forward for the whole group
                    feats = features_at_blocks(teacher, x, trainable + ([last] if len(heads) else []))
                    logits = teacher.head(feats[last][1]) if len(heads) else None
                loss = 0.0
                for b in trainable:
                    t_in, t_out = feats[b]
                    block_loss = 0.0
                    for op in ops[b].values():
                        op.train()
                        e = op.sample_expansion(gens[b]) if cfg.elastic else None
                        k = kept[op.width]  # a narrower interface: the teacher's kept channels in and out
                        block_loss = block_loss + F.mse_loss(op(slice_channels(t_in, k[b]), e).float(), slice_channels(t_out, k[b + 1]).float())
                    history[b].append(block_loss.item() / len(ops[b]))
                    loss = loss + block_loss
                for w in (bound.widths if len(heads) else ()):
                    if w == 1:
                        continue
                    head = heads[width_key(w)].train()
                    loss = loss + F.mse_loss(head(slice_channels(feats[last][1], kept[w][last + 1])).float(), logits.float())
            optimizer_step(loss, opt, scaler)
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
        state = {k: v.detach().cpu() for k, v in ops[b].state_dict().items()}
        if b == last:
            state |= {HEADS + k: v.detach().cpu() for k, v in heads.state_dict().items()}
        out[b] = (state, metrics)
    return out


@torch.no_grad()
def evaluate_block(bound: BoundSpace, block: int, ops, splits, *, device="cpu", max_batches: int = 4) -> dict:
    """Relative MSE (MSE / teacher output variance) of every candidate on the proxy set, unseen in training."""
    res = bound.space.data.resolution
    elastic = bound.space.pretrain.elastic
    errs: dict[str, list[float]] = {}
    for i, (x, _) in enumerate(batches(splits.proxy, 64, resolution=res, device=device)):
        if i >= max_batches:
            break
        t_in, t_out = features_at_blocks(bound.split, x, [block])[block]
        for spec in bound.trainable_specs(block):
            k = bound.kept_channels(spec.width) or [None] * (bound.num_blocks + 1)
            target = slice_channels(t_out, k[block + 1])
            op = ops[super_op_name(spec, elastic)].eval()
            pred = op(slice_channels(t_in, k[block]), spec.expansion) if elastic else op(slice_channels(t_in, k[block]))
            errs.setdefault(str(spec), []).append(float(F.mse_loss(pred, target) / target.var().clamp_min(1e-12)))
    return {k: float(np.mean(v)) for k, v in errs.items()}


def pretrain_task(space_dict: dict, teacher_state: dict, blocks: list[int], seed: int) -> dict:
    """Ray task body: rebuild everything from plain data so it runs on any node (and again, when retried)."""
    import ray

    bound, splits = rebuild(space_dict, teacher_state)
    device = pick_device(bound.space.pretrain.num_gpus)
    t0 = time.time()
    out = pretrain_group(bound, splits, blocks, seed=seed, device=device)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    for b in out:
        out[b][1]["wall_s"] = time.time() - t0
        out[b][1]["finished_at"] = time.time()
        out[b][1]["node"] = node  # which Ray node trained it (provenance; node failures move blocks)
    faults.maybe_die(NAME, f"blocks {blocks}")
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
    out = {}
    with torch_threads(1):
        for b in blocks:
            ops = block_super_ops(bound, b, bound.space.pretrain.elastic).train()
            if not len(ops):  # nothing to train (identity or teacher only)
                out[b] = 0.0
                continue
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                sum(op(torch.randn(batch, *op.slot.in_shape)).float().square().mean() for op in ops.values()).backward()
                best = min(best, time.perf_counter() - t0)
            out[b] = best
    return out


def load_block_states(run: Run, bound: BoundSpace) -> list[dict]:
    """Every block's pretrained super-operators (empty for blocks with nothing to train), each checked
    against the space's operators of that block: a missing, corrupt or foreign file is one line naming it."""
    states = []
    last = bound.num_blocks - 1
    for b in range(bound.num_blocks):
        if not bound.trainable_specs(b) and not (b == last and len(narrow_heads(bound))):
            states.append({})
            continue
        path = run.block_weights(b)
        if not path.is_file():
            raise EtaError(f"missing weights file {path}: block {b} of the pretrain phase; run 'eta pretrain {run.root} --rerun'")
        state = load_tensors(path)
        try:
            ops_state, heads_state = split_heads(state) if b == last else (state, {})
            block_super_ops(bound, b, bound.space.pretrain.elastic).load_state_dict(ops_state)
            if b == last:
                narrow_heads(bound).load_state_dict(heads_state)
        except RuntimeError as err:
            raise EtaError(f"{path} does not hold the pretrained operators of block {b} of this space: {first_line(err)}") from None
        states.append(state)
    return states


def load(ctx: PhaseContext) -> dict:
    return read_json(ctx.run.pretrain_metrics)


def run(ctx: PhaseContext) -> tuple[dict, dict]:
    """Pretrain all blocks not yet on disk, as Ray tasks; returns per-block metrics."""
    import ray

    space, bound, run_dir = ctx.space, ctx.bound, ctx.run
    cfg = space.pretrain
    t0 = time.time()
    metrics = read_json(run_dir.pretrain_metrics) if run_dir.pretrain_metrics.exists() else {}
    pending = [b for b in range(bound.num_blocks) if not (run_dir.block_weights(b).exists() and str(b) in metrics)]
    with ctx.ray(), ctx.tracker(NAME) as tr:
        if not pending:
            log.info("pretrain: all %d blocks already pretrained", bound.num_blocks)
        else:
            groups = plan_groups(pending, cfg.tasks or cpu_slots(cfg.num_cpus), block_costs(bound, pending))
            log.info("pretrain: %d blocks in %d Ray tasks (elastic width %s); %d already on disk", len(pending), len(groups),
                     "on" if cfg.elastic else "off", bound.num_blocks - len(pending))
            teacher_ref = ray.put({k: v.cpu() for k, v in bound.teacher.state_dict().items()})
            use_gpu = cfg.num_gpus > 0
            task = Task(pretrain_task, threads=None if use_gpu else 1, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                        max_retries=3, retry_exceptions=False)
            refs = [task.submit(space.to_dict(), teacher_ref, g, space.seed) for g in groups]
            for _, result in completed(refs, desc="pretrain (blocks)", total=len(pending), progress=ctx.progress, count=len):
                for b, (state, m) in sorted(result.items()):
                    save_tensors(run_dir.block_weights(b), state, {"block": b, "space": space.fingerprint()})
                    metrics[str(b)] = m
                    write_json(run_dir.pretrain_metrics, metrics)
                    tr.log({f"pretrain/block{b:02d}/{k}": v for k, v in m["candidates"].items()})
                    if "loss_last" in m:
                        tr.log({f"pretrain/block{b:02d}/loss_first": m["loss_first"], f"pretrain/block{b:02d}/loss_last": m["loss_last"]})
        rows = [[int(b), spec, err] for b, m in sorted(metrics.items(), key=lambda t: int(t[0])) for spec, err in m["candidates"].items()]
        tr.table("pretrain/candidates", ["block", "operator", "relative_mse"], rows)
        tr.summary(pretrain_wall_s=time.time() - t0)
    return metrics, {"wall_s": time.time() - t0}
