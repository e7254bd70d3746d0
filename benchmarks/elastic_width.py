"""Phase 1 with and without elastic width (thesis table 14.6), side by side in one run.

Both modes pretrain the same operator pool on the same blocks of the same teacher: elastic trains
one super-operator per family and kernel (random prefix widths), the baseline trains every width
as its own operator. Reported: wall time, mean relative distillation error of every candidate on
the proxy split, and the test accuracy of the same student stitched from each bank (BatchNorm
recalibrated) before and after a short finetune.

    python -m benchmarks.elastic_width --space search_spaces/fashion_mnist.yaml --device cuda
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from eta import families
from eta.arch import arch_to_str
from eta.families.conv import ConvFamily
from eta.bound import bound_with_teacher, splits_for
from eta.files import load_tensors, save_tensors
from eta.pareto import format_table
from eta.phases.pretrain import pretrain_group
from eta.space import load_space, parse_space
from eta.student import OperatorBank
from eta.train import evaluate, fit, recalibrate_bn

from .common import run_command

log = logging.getLogger("benchmarks.elastic_width")


def extreme_student(bound, pick=max):
    """Per block the widest (``pick=max``) or narrowest option of the first conv family offered there."""
    arch = []
    for opts in bound.options:
        conv = [o for o in opts if isinstance(families.get(o.family), ConvFamily)]
        same = [o for o in conv if o.super_key == conv[0].super_key] if conv else []
        arch.append(pick(same, key=lambda o: o.expansion) if same else opts[-1])
    return tuple(arch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/fashion_mnist.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", help="trained teacher weights (default: train one, cached in --work)")
    ap.add_argument("--work", default="runs/bench-elastic")
    ap.add_argument("--data-root")
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--epochs", type=int, help="phase-1 epochs (default: the space's)")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    d = load_space(args.space).to_dict()
    if args.data_root:
        d["data"]["root"] = args.data_root
    if args.max_train:
        d["data"]["max_train"] = args.max_train
    if args.epochs:
        d["pretrain"]["epochs"] = args.epochs
    space = parse_space(d)
    splits = splits_for(space)
    work = Path(args.work)
    teacher_path = Path(args.teacher) if args.teacher else work / "teacher.safetensors"
    bound = bound_with_teacher(space, splits, load_tensors(teacher_path) if teacher_path.exists() else None)
    res = space.data.resolution
    if not teacher_path.exists():
        tc = space.teacher.train
        t0 = time.time()
        fit(bound.teacher, splits.train, epochs=tc.epochs, lr=tc.lr, weight_decay=tc.weight_decay, batch_size=tc.batch_size,
            resolutions=[res], seed=space.seed, device=args.device, desc="teacher", progress=False)
        bound.teacher.cpu()
        save_tensors(teacher_path, bound.teacher.state_dict())
        log.info("teacher trained in %.1f s", time.time() - t0)
    teacher_acc = evaluate(bound.teacher.to(args.device), splits.test, resolution=res, device=args.device)
    blocks = list(range(bound.num_blocks))
    rows, out = [], {"space": args.space, "device": args.device, "teacher_acc": teacher_acc, "modes": {}}
    archs = {"widest": extreme_student(bound, max), "narrowest": extreme_student(bound, min)}
    for elastic in (False, True):
        d2 = space.to_dict()
        d2["pretrain"]["elastic"] = elastic
        sp = parse_space(d2)
        b2 = bound_with_teacher(sp, splits, {k: v.cpu() for k, v in bound.teacher.state_dict().items()})
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        result = pretrain_group(b2, splits, blocks, seed=space.seed, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.time() - t0
        errs = [v for b in blocks for v in result[b][1]["candidates"].values()]
        n_ops = sum(len(b2.trainable_specs(b)) for b in blocks)
        bank = OperatorBank(b2, [result[b][0] for b in blocks])
        entry = {"wall_s": wall, "candidates": n_ops, "mean_rel_mse": float(np.mean(errs))}
        for name, arch in archs.items():
            student = bank.stitch(arch).to(args.device)
            recalibrate_bn(student, splits.train, resolution=res, num_batches_=8, device=args.device)
            stitched = evaluate(student, splits.test, resolution=res, device=args.device)
            fit(student, splits.train, epochs=args.finetune_epochs, lr=space.finetune.lr, weight_decay=space.finetune.weight_decay,
                batch_size=space.finetune.batch_size, resolutions=[res], teacher=b2.teacher, kd_weight=space.finetune.kd_weight,
                temperature=space.finetune.temperature, seed=space.seed, device=args.device, progress=False)
            entry[f"{name}_stitched_acc"] = stitched
            entry[f"{name}_finetuned_acc"] = evaluate(student, splits.test, resolution=res, device=args.device)
        mode = "elastic" if elastic else "separate"
        out["modes"][mode] = entry
        rows.append({"mode": mode, **entry})
    out["archs"] = {k: arch_to_str(v) for k, v in archs.items()}
    out["speedup"] = out["modes"]["separate"]["wall_s"] / out["modes"]["elastic"]["wall_s"]
    print(f"\nphase 1, elastic width vs separate operators ({args.space}, {args.device}, teacher test acc {teacher_acc:.4f})")
    print(f"students: widest {out['archs']['widest']}\n          narrowest {out['archs']['narrowest']}\n")
    print(format_table(rows, [("mode", "phase 1", "s"), ("candidates", "operators", "d"), ("wall_s", "wall s", ".1f"),
                              ("mean_rel_mse", "rel. MSE", ".4f"), ("widest_stitched_acc", "widest stitched", ".4f"),
                              ("widest_finetuned_acc", "widest finetuned", ".4f"), ("narrowest_stitched_acc", "narrow stitched", ".4f"),
                              ("narrowest_finetuned_acc", "narrow finetuned", ".4f")]))
    print(f"\nspeed-up of elastic width: {out['speedup']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    run_command(main)
