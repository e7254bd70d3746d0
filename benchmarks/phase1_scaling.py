"""Phase 1 on one Ray worker against two, and whether teacher features should travel through the object store.

Scaling: the same blocks, split into the same block groups, are distilled by Ray tasks of one CPU
each on a local cluster of 1 and then 2 CPUs (workers); wall time and speed-up are printed side by
side. The teacher's weights are random: the cost of distillation does not depend on them.

Features: each task recomputes the teacher's features of its blocks (one forward pass per batch).
The alternative is to compute them once and share them through Ray's object store. The benchmark
measures what recomputing costs per epoch, how many bytes the shared features would be, and what
moving that many bytes through the object store costs here; the cheaper one is the right design.

    python -m benchmarks.phase1_scaling --space search_spaces/fashion_mnist_quick.yaml
    python -m benchmarks.phase1_scaling --gpu      # on a GPU machine: the workers share one GPU (fractional num_gpus)
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from eta.data import batches
from eta.pareto import format_table
from eta.phases.pretrain import block_costs, plan_groups, pretrain_task
from eta.raycluster import Task, ray_session
from eta.teachers import features_at_blocks
from eta.threads import torch_threads

from .common import load_bound_space, run_command

log = logging.getLogger("benchmarks.phase1_scaling")


def phase1_wall(space, teacher_state, groups, workers: int, gpu: bool = False) -> float:
    """Wall time of phase 1's tasks on a local cluster of ``workers`` CPUs (and, with ``gpu``, one GPU they share)."""
    share = 1 / workers if gpu else 0
    space_dict = space.to_dict()
    space_dict["pretrain"]["num_gpus"] = share  # a task trains on the GPU when its space gives it one
    with ray_session(num_cpus=workers, num_gpus=1 if gpu else 0) as ray:
        task = Task(pretrain_task, threads=None if gpu else 1, num_cpus=1, num_gpus=share)
        ref = ray.put(teacher_state)
        ray.get(ray.remote(lambda: None).remote())  # workers started before the clock
        t0 = time.perf_counter()
        ray.get([task.submit(space_dict, ref, g, space.seed) for g in groups])
        return time.perf_counter() - t0


@torch.inference_mode()
def teacher_feature_cost(bound, splits, blocks) -> tuple[float, int]:
    """(seconds of teacher forward per epoch with one thread, bytes of every block's input and output per epoch)."""
    cfg = bound.space
    teacher = bound.split.eval()
    seconds, nbytes = 0.0, 0
    with torch_threads(1):
        for x, _ in batches(splits.train, cfg.pretrain.batch_size, resolution=cfg.data.resolution, drop_last=True):
            t0 = time.perf_counter()
            feats = features_at_blocks(teacher, x, blocks)
            seconds += time.perf_counter() - t0
            nbytes += sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in feats.values())
    return seconds, nbytes


def object_store_seconds(nbytes: int) -> float:
    """Time to put ``nbytes`` into Ray's object store and read them back in another worker process."""
    with ray_session(num_cpus=2) as ray:
        chunk = np.ones(min(nbytes, 256 << 20) // 4, dtype=np.float32)
        reps = max(1, round(nbytes / chunk.nbytes))
        touch = ray.remote(lambda a: float(a[::4096].sum()))
        ray.get(touch.remote(np.ones(4, np.float32)))
        t0 = time.perf_counter()
        for _ in range(reps):
            ray.get(touch.remote(ray.put(chunk)))
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/fashion_mnist_quick.yaml")
    ap.add_argument("--tasks", type=int, default=2, help="block groups (Ray tasks), the same for every cluster size")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpu", action="store_true", help="tasks train on one GPU shared by the workers (num_gpus = 1/workers)")
    args = ap.parse_args(argv)
    space, bound, _ = load_bound_space(args.space)
    from eta.bound import splits_for

    splits = splits_for(space)
    trainable = [b for b in range(bound.num_blocks) if bound.trainable_specs(b)]
    groups = plan_groups(trainable, args.tasks, block_costs(bound, trainable))  # as the pretrain phase plans them
    state = {k: v.cpu() for k, v in bound.teacher.state_dict().items()}
    rows = []
    for w in args.workers:
        log.info("phase 1 on %d worker(s), groups %s", w, groups)
        rows.append({"workers": w, "wall": phase1_wall(space, state, groups, w, gpu=args.gpu)})
    for r in rows:
        r["speedup"] = rows[0]["wall"] / r["wall"]
    per_task = "1 CPU" + (" and 1/workers of the GPU" if args.gpu else "")
    print(f"\n{space.name}: phase 1, {len(trainable)} blocks in {len(groups)} Ray tasks of {per_task}, {space.pretrain.epochs} epoch(s)\n")
    print(format_table(rows, [("workers", "workers (CPUs)", "d"), ("wall", "phase 1 wall s", ".1f"), ("speedup", "speed-up", ".2f")]))

    fwd_s, nbytes = teacher_feature_cost(bound, splits, trainable)
    store_s = object_store_seconds(nbytes)
    extra = (len(groups) - 1) * fwd_s  # every task but one repeats (at most) the teacher forward
    saving = extra - store_s
    share = saving > 0.1 * rows[-1]["wall"] / space.pretrain.epochs  # worth its memory only if it saves a tenth of an epoch
    print(f"\nteacher features per epoch: one teacher forward over the training set takes {fwd_s:.1f} s (1 CPU); with "
          f"{len(groups)} tasks recomputing costs at most {extra:.1f} s more than computing once. Sharing moves "
          f"{nbytes / 2**30:.2f} GiB per epoch through the object store ({store_s:.1f} s to put and read back here) and holds "
          f"that much store memory: it would save {saving:.1f} s per epoch ({100 * saving / rows[-1]['wall'] * space.pretrain.epochs:.0f} % "
          f"of phase 1 on {rows[-1]['workers']} workers). " + ("Sharing is worth it." if share else "Recomputing is the better design."))
    return 0


if __name__ == "__main__":
    run_command(main)
