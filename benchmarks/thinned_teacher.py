"""The teacher thinned between its blocks at each interface width of a finished run, through eta's own recipe.

`teacher_x<w>` in every block is the teacher with w of its channels between blocks (hidden widths
kept), initialised from the teacher: this trains it as phase 3 trains a chosen student (from the run's phase-1 operators,
the space's finetune recipe) and reports its proxy accuracy before and its test accuracy after, so
it can be set against the width-scaled baselines of `benchmarks.headline` and the run's own front:
whether a loss is in eta's operators and training or in its selection.

    python -m benchmarks.thinned_teacher runs/fashion_mnist_torch
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eta.arch import OpSpec, arch_to_str
from eta.phases import pretrain
from eta.phases.finetune import finetune_student
from eta.phases.solve import proxy_accuracy
from eta.pipeline import Search
from eta.student import OperatorBank

from .common import run_command, setup_logging


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/measurements"))
    args = ap.parse_args(argv)
    setup_logging()
    search = Search.from_run(args.run)
    search.phase("teacher")
    bound, splits = search.bound, search.splits
    bank = OperatorBank(bound, pretrain.load_block_states(search.run, bound))
    rows = []
    for width in (w for w in bound.widths if w < 1):
        arch = tuple(OpSpec("teacher", width=width) for _ in range(bound.num_blocks))
        proxy = proxy_accuracy(bank, splits, [bound.choices(arch)], seed=bound.space.seed)[0]
        t0 = time.time()
        _, _, accs = finetune_student(bound, bank, splits, arch)
        rows.append({"arch": arch_to_str(arch), "width": width, "proxy_acc_before_finetune": proxy,
                     "test_acc": {str(r): a for r, a in accs.items()}, "finetune_s": time.time() - t0})
        print(f"{rows[-1]['arch']}: proxy {proxy:.4f} before finetuning; test {accs} after ({rows[-1]['finetune_s']:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"thinned_teacher-{args.run.name}.json"
    path.write_text(json.dumps({"run": str(args.run), "epochs": bound.space.finetune.epochs, "rows": rows}, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    run_command(main)
