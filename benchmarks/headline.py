"""eta's front against what a user would try first, on the same teacher, data split and latency backend.

From a finished run, each baseline is built from the same teacher and trained with the same
distillation recipe as the finetune phase (KD from the teacher's logits + cross-entropy, the
finetune phase's learning rate, weight decay, temperature and augmentation) for the same total
training budget as eta's pretrain and finetune phases together (their epochs over the same train
split), then measured end to end on the backend and evaluated on the test split:

- ``width``: the teacher's family at a width multiplier (from scratch: it gets the teacher's own
  epochs as well, more than the budget, so as not to starve it);
- ``resolution``: the teacher itself at each lower resolution of the space (finetuned there);
- ``tp-magnitude-uniform`` / ``tp-magnitude-global`` / ``tp-taylor-uniform`` / ``tp-taylor-global``:
  Torch-Pruning's dependency-graph pruning of the trained teacher, magnitude (L1) or Taylor
  importance, one ratio for every layer or a global ranking; each at ratios chosen (from measured
  latencies of a ratio sweep) so that it lands near a latency of eta's front;
- ``fastnas``: NVIDIA Model-Optimizer's FastNAS (``nvidia-modelopt``) on the CPU, under FLOPs limits a
  user would set for eta's latencies: the teacher's FLOPs times eta's latency over the teacher's (a
  student's own FLOPs can lie below anything channel pruning reaches: eta may drop whole blocks, so
  limits below FastNAS's smallest network are raised to it);
- ``int8``: the teacher with every block quantized to 8 bits (calibrated), where the backend
  executes integers (TVM).

On a tuned TVM table every baseline's tasks are tuned first with the per-task budget eta's own
networks got, so no baseline runs TVM's untuned fallback where eta's students run tuned code. At
the end every network compared, eta's front and the teacher included, is timed again in the same
sweeps (``--rounds``, each network's fastest kept), so no comparison carries the machine's drift between
the times its two points were measured.

It prints one table (method, measured latency, test accuracy, eta's accuracy at that latency, eta's
speed-up at that accuracy), writes it as JSON under ``docs/measurements/`` and draws every front on
one plot. Each trained baseline is kept in the run's ``benchmarks/headline/models/`` and each
latency in ``benchmarks/headline/<backend>/``, so a rerun resumes and a second backend
(``--backend torch``: everything, eta's front included, in eager PyTorch) trains nothing again:
the pruning ratios and FLOPs limits chosen on the first backend benchmarked are kept for the run
(``targets.json``). Sweep on the cheap backend first: on tuned TVM each swept model is tuned.

    python -m benchmarks.headline runs/fashion --baselines width resolution tp fastnas int8
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eta.errors import EtaError, first_line
from eta.files import atomic_path, read_json, write_json
from eta.pareto import format_table, pareto_front
from eta.student import count_params
from eta.train import evaluate, fit

from .common import load_solved_run, run_command, setup_logging

log = logging.getLogger("benchmarks.headline")

BASELINES = ("width", "resolution", "tp", "fastnas", "int8")
TP_VARIANTS = [(imp, scope) for imp in ("magnitude", "taylor") for scope in ("uniform", "global")]


class Bench:
    """The run, its budget and recipe, and a latency table on the chosen backend."""

    def __init__(self, run_dir: Path, backend: str | None):
        from eta.augment import for_space
        from eta.latency.backends import schedule_policy
        from eta.latency.measurer import Measurer
        from eta.phases import latency

        self.search, self.info, _, _ = load_solved_run(run_dir)
        self.space, self.bound, self.splits = self.search.space, self.search.bound, self.search.splits
        self.res = self.space.data.resolution
        self.budget = self.space.pretrain.epochs + self.space.finetune.epochs
        self.augment = for_space(self.space, self.splits.num_classes)
        cfg = self.space.latency
        if backend is None or backend == cfg.backend:
            self.measurer, self.table = latency.opened_table(self.search.ctx, self.info)
        else:
            protocol = latency.measurer(self.space).protocol
            self.measurer = Measurer.create(backend, "cpu" if backend == "torch" else cfg.target, protocol, schedule_policy(backend))
            self.table = self.measurer.open_table()
        self.root = self.search.run.benchmarks_dir / "headline"
        self.models = self.root / "models"  # trained baselines, whatever backend measures them
        self.cache = self.root / self.measurer.backend  # points measured on this backend
        for d in (self.models, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self.networks: dict[str, tuple] = {}  # point key -> (network loader, resolution), to time them side by side

    def latency(self, model: nn.Module, resolution: int) -> float:
        """End to end on the backend; on a tuned table the model's own tasks are tuned first, as eta's networks were."""
        from eta.phases.latency import model_workload, tune

        w = model_workload(self.bound, model.eval(), resolution)
        tune(self.space, self.measurer, self.table, [w], name=f"baseline {w.signature}", progress=False)
        self.table.measure_many([w], progress=False, executor=self.measurer.executor())
        ms = self.table.get(w.signature, w.input_shape, w.bits)
        if ms is None:
            raise EtaError(f"{type(model).__name__} at {resolution} px: {self.table.entry(w.signature, w.input_shape).get('reason')}")
        return ms

    def distil(self, model: nn.Module, epochs: int, resolution: int | None = None) -> nn.Module:
        """The finetune phase's recipe: KD from the teacher + cross-entropy, its optimiser settings and augmentation."""
        ft = self.space.finetune
        fit(model, self.splits.train, epochs=epochs, lr=ft.lr, weight_decay=ft.weight_decay, batch_size=ft.batch_size,
            resolutions=[resolution or self.res], teacher=self.bound.teacher, kd_weight=ft.kd_weight, temperature=ft.temperature,
            seed=self.space.seed, progress=False, augment=self.augment)
        return model.eval()

    def accuracy(self, model: nn.Module, resolution: int | None = None) -> float:
        return evaluate(model, self.splits.test, resolution=resolution or self.res)

    def cached(self, key: str, compute) -> dict:
        """One point measured on this backend, computed once and kept in the run (``compute() -> dict``)."""
        path = self.cache / f"{key}.json"
        if path.exists():
            return read_json(path)
        log.info("baseline %s", key)
        point = {"method": key, **compute()}
        write_json(path, point)
        return point

    def trained(self, key: str, build, epochs: int) -> dict:
        """A baseline trained once per run for ``epochs`` and measured on this backend.

        ``build() -> (model, fields)`` trains and evaluates it (``fields``: resolution, test accuracy,
        epochs...; or ``{"error": ...}`` where the method cannot make it); the model and its fields are
        kept in ``models/``, so every backend measures the same trained network. One trained for other
        epochs (the run's budget changed since) is trained again, and its measurements are dropped.
        """
        fields_path = self.models / f"{key}.json"
        if fields_path.exists():
            kept = read_json(fields_path).get("epochs")
            if kept is not None and kept != epochs:
                log.info("baseline %s was trained for %s epochs, the budget is now %d: training it again", key, kept, epochs)
                fields_path.unlink()
                for measured in self.root.glob(f"*/{key}.json"):
                    measured.unlink()

        def compute():
            weights, fields_path = self.models / f"{key}.pt", self.models / f"{key}.json"
            if fields_path.exists():
                fields = read_json(fields_path)
                model = torch.load(weights, weights_only=False) if "error" not in fields else None
            else:
                log.info("training baseline %s", key)
                model, fields = build()
                if model is not None:
                    with atomic_path(weights) as tmp:
                        torch.save(model, tmp)
                write_json(fields_path, fields)
            if model is None:
                return fields
            return {**fields, "latency_ms": self.latency(model, fields["resolution"])}
        point = self.cached(key, compute)
        if "error" not in point:
            self.networks[key] = (lambda: torch.load(self.models / f"{key}.pt", weights_only=False), point["resolution"])
        return point

    def chosen(self, name: str, choose) -> list:
        """A baseline's settings aimed at eta's front (pruning ratios, FLOPs limits), chosen on the first backend
        benchmarked and kept for the run, so other backends measure the same trained models."""
        path = self.root / "targets.json"
        targets = read_json(path) if path.exists() else {}
        if name not in targets:
            targets[name] = {"values": [float(v) for v in choose()], "chosen_on": self.measurer.backend}
            write_json(path, targets)
        elif targets[name]["chosen_on"] != self.measurer.backend:
            log.info("%s: settings chosen on the %s backend reused", name, targets[name]["chosen_on"])
        return targets[name]["values"]

    def eta_points(self) -> list[dict]:
        """Every point eta finetuned (student x resolution), re-measured on this backend when it is not the run's:
        the front is taken after the side-by-side timing, which may reorder points measured hours apart."""
        from eta.export import build_student
        from eta.runs import Run

        run = Run(self.search.run.root)
        points = read_json(self.search.run.pareto_json)["all"]
        if self.measurer.backend != self.info.backend:
            measured = []
            for p in points:
                m = self.cached(front_key(p), lambda p=p: {"latency_ms": self.latency(build_student(run, p, self.bound), p["resolution"]),
                                                           "test_acc": p["test_acc"]})
                measured.append({**p, "latency_ms": m["latency_ms"]})  # the accuracy as the run has it now (a --remeasure may
                # have re-estimated a resolution's statistics since this latency was kept)
            points = measured
        for p in points:
            self.networks[front_key(p)] = (lambda p=p: build_student(run, p, self.bound), p["resolution"])
        return points

    def side_by_side(self, points: list[dict], rounds: int = 2) -> None:
        """Time every network of the comparison afresh in the same sweeps, and compare those figures.

        Points measured minutes or hours apart (eta's front in the search, each baseline when it was
        trained) carry the machine's drift between them; the table's figure stays as ``table_latency_ms``.
        """
        from eta.phases.latency import model_workload

        keys = [p.get("method") or front_key(p) for p in points]
        workloads = [model_workload(self.bound, self.networks[k][0]().eval(), self.networks[k][1]) for k in keys]
        log.info("timing %d networks side by side (%s)", len(workloads), self.measurer.backend)
        for p, ms in zip(points, self.table.time_now(workloads, self.measurer.executor(), rounds=rounds)):
            if ms is not None:
                p["table_latency_ms"], p["latency_ms"] = p["latency_ms"], ms


# --- baselines ---------------------------------------------------------------------------------------
def width_points(b: Bench, widths) -> list[dict]:
    from eta.teachers import build_teacher

    tc = b.space.teacher
    epochs = max(tc.train.epochs, b.budget)
    out = []
    for w in widths:
        def build(w=w):
            torch.manual_seed(b.space.seed)
            model = build_teacher(tc.model, num_classes=b.bound.num_classes, in_chans=b.bound.in_chans,
                                  kwargs={**tc.kwargs, "width_mult": w})
            b.distil(model, epochs)
            return model, {"resolution": b.res, "test_acc": b.accuracy(model), "epochs": epochs, "params": count_params(model)}
        out.append(b.trained(f"width-{w:g}", build, epochs))
    return out


def resolution_points(b: Bench) -> list[dict]:
    out = []
    for r in b.space.resolutions:
        if r == b.res:
            continue

        def build(r=r):
            model = b.distil(copy.deepcopy(b.bound.teacher), b.budget, r)
            return model, {"resolution": r, "test_acc": b.accuracy(model, r), "epochs": b.budget}
        out.append(b.trained(f"resolution-{r}", build, b.budget))
    return out


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def tp_prune(b: Bench, importance: str, scope: str, ratio: float) -> nn.Module:
    """The trained teacher pruned by Torch-Pruning at ``ratio`` (the classifier's outputs kept)."""
    import torch_pruning as tp

    model = copy.deepcopy(b.bound.teacher).eval()
    example = torch.randn(*b.bound.input_shape(b.res, batch=2))
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "magnitude" else tp.importance.TaylorImportance()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=scope == "global",
                                  ignored_layers=_classifier(model))
    if importance == "taylor":  # first-order Taylor needs gradients of the task loss
        from eta.data import batches

        model.train()
        for i, (x, y) in enumerate(batches(b.splits.train, 64, resolution=b.res, shuffle=True, seed=b.space.seed)):
            if i == 4:
                break
            nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_points(b: Bench, targets_ms: list[float], ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), variants=TP_VARIANTS) -> list[dict]:
    """Each variant swept over ``ratios`` (latency only), then pruned at the ratio that lands on each target and trained."""
    out = []
    for importance, scope in variants:
        name = f"tp-{importance}-{scope}"

        def choose(importance=importance, scope=scope, name=name):
            sweep = b.cached(f"{name}-sweep", lambda: {"ratios": list(ratios), "latency_ms": [
                b.latency(tp_prune(b, importance, scope, r), b.res) for r in ratios]})
            lat = np.array(sweep["latency_ms"])
            order = np.argsort(lat)
            return [float(np.interp(t, lat[order], np.array(sweep["ratios"])[order])) for t in targets_ms]

        # targets below the sweep's fastest point all clip to its smallest ratio: that model once
        for ratio in dict.fromkeys(round(r, 3) for r in b.chosen(name, choose)):
            def build(ratio=ratio, importance=importance, scope=scope):
                model = b.distil(tp_prune(b, importance, scope, ratio), b.budget)
                return model, {"resolution": b.res, "ratio": ratio, "test_acc": b.accuracy(model), "epochs": b.budget,
                               "params": count_params(model)}
            out.append(b.trained(f"{name}-{ratio:.3f}", build, b.budget))
    return out


# Every layer type of eta's teachers FastNAS should resize, at a divisor of 4 (its default, 32, leaves 16- and 32-channel
# layers of small networks unprunable). A type missing here is not made dynamic, and the layers it couples with stay fixed.
FASTNAS_RULES = {**{t: {"*": {"channel_divisor": 4}} for t in ("nn.Conv2d", "nn.GroupNorm")},
                 **{t: {"*": {"feature_divisor": 4}} for t in ("nn.Linear", "nn.BatchNorm2d", "nn.LayerNorm")}}


def feasible_flops_limits(model: nn.Module, dummy: torch.Tensor, flops_limits: list[float]) -> list[float]:
    """The limits raised to the smallest network FastNAS can make of ``model`` (below it the search has no answer), deduplicated."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.nas.utils import inference_flops

    space = mtn.convert(model, mode=[("fastnas", FASTNAS_RULES)])
    mtn.sample(space, sample_func=min)
    smallest = float(inference_flops(space, dummy_input=dummy, unit=1.0))
    raised = sorted({max(limit, 1.02 * smallest) for limit in flops_limits})
    if len(raised) < len(flops_limits) or min(flops_limits) < smallest:
        log.info("FastNAS: its smallest network has %.3g FLOPs; limits %s", smallest, ", ".join(f"{v:.3g}" for v in raised))
    return raised


def fastnas_points(b: Bench, flops_limits: list[float]) -> list[dict]:
    """Model-Optimizer's FastNAS on the trained teacher under each FLOPs limit, scored on the proxy split."""
    import modelopt.torch.prune as mtp

    from eta.data import batches

    score_data = [(x, y) for _, (x, y) in zip(range(4), batches(b.splits.proxy, 64, resolution=b.res))]

    def score(model):
        return evaluate(model, b.splits.proxy, resolution=b.res)

    def teacher_copy():
        return copy.deepcopy(b.bound.teacher).eval().to(memory_format=torch.contiguous_format)  # FastNAS refuses channels-last weights

    dummy = torch.randn(*b.bound.input_shape(b.res))
    out = []
    for limit in b.chosen("fastnas", lambda: feasible_flops_limits(teacher_copy(), dummy, flops_limits)):
        def build(limit=limit):
            model = teacher_copy()
            try:
                model, _ = mtp.prune(model=model, mode=[("fastnas", FASTNAS_RULES)], constraints={"flops": limit}, dummy_input=dummy,
                                     config={"data_loader": score_data, "score_func": score,
                                             "checkpoint": str(b.models / f"fastnas-{limit:.0f}-search.pth")})
            except Exception as err:  # noqa: BLE001 - FastNAS raises many types for models it cannot convert
                return None, {"error": f"{type(err).__name__}: {first_line(err)}"}
            b.distil(model, b.budget)
            return model, {"resolution": b.res, "flops_limit": limit, "test_acc": b.accuracy(model), "epochs": b.budget}
        out.append(b.trained(f"fastnas-{limit:.0f}", build, b.budget))
    return out


def int8_teacher(b: Bench) -> nn.Module:
    """The teacher with every block quantized to 8 bits, calibrated on four seeded training batches."""
    from eta.data import batches
    from eta.quant.network import quantize_student

    teacher = b.bound.split
    calib = [x for _, (x, _) in zip(range(4), batches(b.splits.train, 64, resolution=b.res, shuffle=True, seed=b.space.seed))]
    return quantize_student(teacher, [8] * len(teacher.blocks), calib)


def int8_points(b: Bench) -> list[dict]:
    def compute():
        try:  # quantizing (a block with no integer lowering), or timing (a backend without integer kernels)
            q = int8_teacher(b)
            return {"resolution": b.res, "latency_ms": b.latency(q, b.res), "test_acc": b.accuracy(q), "epochs": 0}
        except EtaError as err:
            return {"error": str(err)}
    point = b.cached("int8", compute)
    if "error" not in point:
        b.networks["int8"] = (lambda: int8_teacher(b), b.res)
    return [point]


def front_key(p: dict) -> str:
    return f"eta-{p['id']}-{p['resolution']}"


def flops(model: nn.Module, shape) -> float:
    from eta.student import count_macs

    return 2.0 * sum(count_macs(model, shape).values())


# --- comparison ----------------------------------------------------------------------------------------
def compare(point: dict, front: list[dict]) -> dict:
    """eta's accuracy gain at the baseline's latency (its best front point no slower) and its speed-up at the
    baseline's accuracy (the baseline's latency over eta's fastest front point no less accurate)."""
    faster = [p for p in front if p["latency_ms"] <= point["latency_ms"]]
    better = [p for p in front if p["test_acc"] >= point["test_acc"]]
    return {"eta_acc": max(p["test_acc"] for p in faster) if faster else None,
            "gain": (max(p["test_acc"] for p in faster) - point["test_acc"]) * 100 if faster else None,
            "speedup": point["latency_ms"] / min(p["latency_ms"] for p in better) if better else None}


def plot(front: list[dict], rows: list[dict], teacher: dict, path: Path, title: str) -> None:
    from eta.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    ax.plot([p["latency_ms"] for p in front], [p["test_acc"] for p in front], "o-", lw=2, c="tab:blue", label="eta front")
    groups: dict[str, list[dict]] = {}
    for r in (r for r in rows if r["method"] != "teacher"):  # the teacher is the star
        groups.setdefault(r["method"].rsplit("-", 1)[0] if r["method"].startswith(("tp-", "width", "resolution", "fastnas")) else r["method"],
                          []).append(r)
    for i, (name, pts) in enumerate(sorted(groups.items())):  # C0 is eta's
        pts = sorted(pts, key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in pts], [p["test_acc"] for p in pts], "s--", ms=4, lw=0.8, c=f"C{i % 9 + 1}", label=name)
    ax.plot([teacher["latency_ms"]], [teacher["test_acc"]], "k*", ms=12, label="teacher")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    ap.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--targets", type=int, default=3, help="latencies of eta's front the pruning baselines aim at")
    ap.add_argument("--tp", nargs="+", default=[f"{i}-{s}" for i, s in TP_VARIANTS], choices=[f"{i}-{s}" for i, s in TP_VARIANTS],
                    help="Torch-Pruning variants (importance-scope)")
    ap.add_argument("--tp-ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                    help="pruning ratios of the latency sweep that places the Torch-Pruning points (fewer: less tuning on TVM)")
    ap.add_argument("--backend", choices=["tvm", "torch"], help="measure on this backend (default: the run's)")
    ap.add_argument("--out", type=Path, default=Path("docs/measurements"), help="folder for the JSON table and the plot")
    ap.add_argument("--no-side-by-side", dest="side_by_side", action="store_false",
                    help="compare the figures each point got when measured, not a fresh timing of all in one sweep")
    ap.add_argument("--rounds", type=int, default=2,
                    help="sweeps of the side-by-side timing, each network's fastest kept (more on a noisy machine)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least one sweep")
    if not all(0 < r < 1 for r in args.tp_ratios):
        ap.error(f"--tp-ratios {args.tp_ratios}: each ratio is the fraction of channels pruned, in (0, 1)")
    setup_logging()

    b = Bench(args.run, args.backend)
    points = b.eta_points()
    front = pareto_front(points)
    picks = [front[int(i)] for i in np.unique(np.linspace(0, len(front) - 1, min(args.targets, len(front))).round())]
    rows = []
    with b.search.ctx.latency_session():
        teacher = b.cached("teacher", lambda: {"resolution": b.res, "latency_ms": b.latency(b.bound.teacher, b.res),
                                               "test_acc": b.accuracy(b.bound.teacher)})
        if "width" in args.baselines:
            rows += width_points(b, args.widths)
        if "resolution" in args.baselines:
            rows += resolution_points(b)
        if "tp" in args.baselines:
            rows += tp_points(b, [p["latency_ms"] for p in picks], ratios=tuple(args.tp_ratios),
                              variants=[tuple(v.split("-")) for v in args.tp])
        if "fastnas" in args.baselines:
            teacher_flops = flops(b.bound.teacher, b.bound.input_shape(b.res))
            rows += fastnas_points(b, [teacher_flops * p["latency_ms"] / teacher["latency_ms"] for p in picks])
        if "int8" in args.baselines:
            if b.measurer.backend == "tvm":
                rows += int8_points(b)
            else:
                log.info("int8 baseline skipped: backend %s has no integer kernels", b.measurer.backend)
        b.networks["teacher"] = (lambda: b.bound.teacher, b.res)
        failed = [r for r in rows if "error" in r]
        rows = [r for r in rows if "error" not in r] + [teacher]
        if args.side_by_side:
            b.side_by_side(points + rows, rounds=args.rounds)
            front = pareto_front(points)
    for r in rows:
        r.update(compare(r, front))
    name = b.search.run.root.name
    where = f"{b.measurer.backend} ({b.measurer.schedule}) on {b.measurer.device}"
    when = (f"every network timed again side by side, the fastest of {args.rounds} sweeps" if args.side_by_side
            else "each as measured when it was made")
    print(f"\n{name}: eta's front ({len(front)} points, {front[0]['latency_ms']:.3f}-{front[-1]['latency_ms']:.3f} ms) against "
          f"the baselines; latency measured end to end with {where} ({when}); training budget {b.budget} epochs per baseline\n")
    print(format_table(rows, [("method", "baseline", "s"), ("latency_ms", "latency ms", ".3f"), ("test_acc", "test acc", ".4f"),
                              ("eta_acc", "eta acc at that latency", ".4f"), ("gain", "eta gain (points)", "+.2f"),
                              ("speedup", "eta speed-up at that accuracy", ".2f")]))
    for r in failed:
        print(f"\n{r['method']}: did not run: {r['error']}")
    print("\neta front:\n" + format_table(front, [("arch", "architecture", "s"), ("resolution", "res", "d"),
                                                  ("latency_ms", "latency ms", ".3f"), ("test_acc", "test acc", ".4f")]))
    out = args.out / f"headline-{name}-{b.measurer.backend}.json"
    write_json(out, {"run": name, "backend": where, "latency": when, "budget_epochs": b.budget, "front": front, "baselines": rows,
                     "failed": failed})
    plot(front, rows, teacher, args.out.parent / "figures" / f"headline-{name}-{b.measurer.backend}.png", f"{name}: {where}")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
