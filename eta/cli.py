"""The ``eta`` command line: a verb per phase, one for the whole search, and ways to get students out."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import EtaError

log = logging.getLogger("eta")

DEMO_SPACE = "digits.yaml"  # among the search spaces shipped with eta


def _latency_overrides(args) -> dict:
    """The latency settings given on the command line (``eta search``, ``demo``, ``latency build/validate``)."""
    keys = ("backend", "target", "schedules", "node_resource")  # flags named after the space's latency fields
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    trials = getattr(args, "tune_trials", None)
    if trials is not None:  # --tune-trials 0: untuned; N: tuned, N trials per task
        out["schedules"] = "tuned" if trials > 0 else "untuned"
        if trials > 0:
            out["tune"] = {"trials_per_task": trials}
    if getattr(args, "deepen", False):
        if not trials:
            raise EtaError("--deepen needs --tune-trials N: the trials each task of the space should have had")
        out["tune"]["deepen"] = True
    return out


def _space_or_run(arg: str, args, budgets=None):
    """A search space YAML (a run is created or resumed) or an existing run directory."""
    from .space import load_space, parse_space

    common = dict(address=args.address, num_cpus=args.num_cpus, progress=not args.no_progress)
    latency = _latency_overrides(args)
    p = Path(arg)
    if p.is_dir() and (p / "manifest.json").exists():
        if budgets or latency:
            flags = "--budgets" if budgets else "/".join("--" + k.replace("_", "-") for k in latency)
            raise EtaError(f"{flags} applies to a search space, not to an existing run; edit the space or start a new run")
        from .pipeline import Search

        search = Search.from_run(p, **common)
        _apply_tracking(search.space, args)
        return search
    space = load_space(p)
    if budgets or latency:
        d = space.to_dict()
        if budgets:
            d["budgets"] = list(budgets)
        old = d.get("latency", {})
        d["latency"] = {**old, **latency}
        if "tune" in latency:  # the flags' tuning settings over the space's, which keep what the flags do not set
            d["latency"]["tune"] = {**(old.get("tune") or {}), **latency["tune"]}
        space = parse_space(d, f"{p} with command-line settings")
    _apply_tracking(space, args)
    from .pipeline import Search  # after the space is read: a bad space is reported without loading the pipeline

    return Search(space, runs_dir=Path(args.runs_dir), name=args.name, force=args.force, **common)


def _apply_tracking(space, args) -> None:
    if getattr(args, "wandb", None):
        space.tracking.wandb = args.wandb
    if getattr(args, "wandb_project", None):
        space.tracking.project = args.wandb_project


def _print_front(pareto: dict, source) -> None:
    """Print a front (``source``: the pareto.json it came from, named when it is not one eta wrote)."""
    from .errors import first_line
    from .pareto import FRONT_COLUMNS, format_table

    try:
        teacher = pareto["teacher"]
        text = (f"\nPareto front of {pareto['run']}  (latency measured with {pareto['backend']} on {pareto['device']})\n\n"
                + format_table(pareto["front"], FRONT_COLUMNS) + "\n\nteacher " + teacher["model"] + ": " + ", ".join(
                    f"{t['resolution']}px {t['latency_ms']:.3f} ms acc {t['test_acc']:.4f}" for t in teacher["points"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise EtaError(f"{source}: not a Pareto front written by eta ({type(err).__name__}: {first_line(err)})") from None
    print(text)


def _budget_arg(s: str):
    try:
        return float(s)
    except ValueError:
        return s


def cmd_search(args) -> int:
    with _space_or_run(args.space, args, args.budgets) as search:
        pareto = search.run_all()
    _print_front(pareto, search.run.pareto_json)
    print(f"\nrun: {search.run.root}  (pareto.json, pareto.png, W&B offline runs in {search.run.wandb_dir})")
    return 0


def cmd_demo(args) -> int:
    from .paths import reference_spaces_dir

    spaces = reference_spaces_dir()
    if spaces is None or not (spaces / DEMO_SPACE).is_file():
        raise EtaError(f"the demo space {DEMO_SPACE} is not installed with eta (package data eta.spaces); reinstall eta")
    args.space = str(spaces / DEMO_SPACE)
    args.budgets = None
    return cmd_search(args)


def _phase_cmd(phase: str):
    def run(args) -> int:
        from .runs import PHASES

        with _space_or_run(args.space, args) as search:
            for p in PHASES:
                if p == phase or phase == "latency":  # latency depends on the teacher's architecture, not on its weights
                    break
                search.phase(p)
            out = search.phase(phase, force=args.rerun, **({"remeasure": True} if getattr(args, "remeasure", False) else {}))
        if phase == "finetune":
            _print_front(out, search.run.pareto_json)
        elif phase == "solve":
            from .pareto import format_table

            print(f"predictor Spearman on held-out architectures: {out['predictor']['spearman_holdout']:.3f}")
            print(format_table(out["solutions"], [("budget_ms", "budget ms", ".3f"), ("rank", "#", "d"), ("arch", "architecture", "s"),
                                                  ("predicted_acc", "predicted", ".4f"), ("proxy_acc", "proxy acc", ".4f"),
                                                  ("predicted_latency_ms", "latency ms", ".3f"), ("solver_s", "solver s", ".2f")]))
        elif phase == "latency":
            cal = out.calibration
            print(f"latency table: {out.table}  ({out.backend}, {out.schedule}, {out.device})")
            print("teacher: " + ", ".join(f"{r}px {ms:.3f} ms" for r, ms in out.teacher_ms.items()))
            print(f"calibration ({cal.get('kind', 'line')}, {len(cal['students'])} whole networks): a={cal['a']:.3f} "
                  f"b={cal['b']:.3f} ms c={cal.get('c', 0.0):.3f} ms/operator"
                  + (f" a_int={cal['a_int']:.3f} (integer entries)" if cal.get("a_int") is not None else ""))
        print(f"run: {search.run.root}")
        return 0

    return run


def cmd_latency_validate(args) -> int:
    from .pareto import format_table

    if args.students < 3:
        raise EtaError(f"--students must be at least 3 to judge the table, got {args.students}")
    with _space_or_run(args.space, args) as search:
        rep = search.validate_latency(args.students, args.seed, Path(args.plot) if args.plot else None)
    n = len(rep["students"])
    print(f"\nlatency table {rep['table']}\n{rep['backend']} ({rep['schedule']}) on {rep['device']}: {n} whole networks "
          f"compiled end to end against the sum of their table entries\n")
    cv = rep.get("cross_validated_mape", {})
    rows = [{"model": "Σ table", "r": rep["before"]["pearson_r"], "mape": 100 * rep["before"]["mape"],
             "worst": 100 * rep["before"]["max_abs_rel_error"], "cv": float("nan")},
            {"model": f"calibrated: {rep['kind']}", "r": rep["after"]["pearson_r"], "mape": 100 * rep["after"]["mape"],
             "worst": 100 * rep["after"]["max_abs_rel_error"], "cv": 100 * cv.get(rep["kind"], float("nan"))}]
    print(format_table(rows, [("model", "prediction", "s"), ("r", "Pearson r", ".4f"), ("mape", "MAPE %", ".2f"),
                              ("worst", "worst %", ".1f"), ("cv", "5-fold MAPE %", ".2f")]))
    int_term = f" {rep['a_int'] - rep['a']:+.4f}·Σinteger entries" if rep.get("a_int") is not None else ""
    print(f"\ncalibration: measured ≈ {rep['a']:.4f}·Σtable{int_term} {rep.get('c', 0.0):+.4f}·operators {rep['b']:+.4f} ms "
          f"(alternatives, 5-fold MAPE: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in cv.items()) + ")")
    worst = [{"arch": rep["students"][w["index"]]["arch"], "pred": w["predicted"], "meas": w["measured"], "err": 100 * w["rel_error"]}
             for w in rep["after"]["worst"]]
    print("\nworst students after calibration:\n" + format_table(worst, [("arch", "architecture", "s"), ("pred", "predicted ms", ".3f"),
                                                                        ("meas", "measured ms", ".3f"), ("err", "error %", "+.1f")]))
    print(f"\nstored with the table (space key {rep['space_key']}); every search of this space uses it. run: {search.run.root}")
    return 0


def cmd_teacher_train(args) -> int:
    with _space_or_run(args.space, args) as search:
        info = search.phase("teacher", force=args.rerun)
    if args.out:
        import shutil

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(search.teacher_path, args.out)
        print(f"teacher weights copied to {args.out}")
    print(f"teacher test accuracy: {info['test_acc']}  weights: {search.teacher_path}")
    return 0


def cmd_pareto(args) -> int:
    from .export import read_front
    from .runs import Run

    run = Run.open(Path(args.run))
    _print_front(read_front(run).to_dict(), run.pareto_json)
    return 0


def cmd_export(args) -> int:
    from .export import export_student

    meta = export_student(Path(args.run), Path(args.output), args.max_latency_ms, args.resolution, force=args.force, integer=args.int)
    print(f"exported {meta['arch']} at {meta['resolution']}px: {meta['latency_ms']:.3f} ms, test acc {meta['test_acc']:.4f} -> {args.output}")
    if not args.int:
        print(f"load with: torch.export.load('{Path(args.output) / 'student.pt2'}').module()  (or student.onnx)")
        d = meta.get("deployed")
        if d:
            print(f"TVM library {Path(args.output) / d['module']} ({d['schedule']} schedules): {d['latency_ms']:.3f} ms measured now, "
                  f"{d['front_latency_ms']:.3f} ms on the front; outputs within {d['max_abs_diff_vs_pytorch']:.1e} of PyTorch; "
                  f"run it with: cd {args.output} && python run_student.py")
    else:
        i = meta["integer"]
        print(f"integer TVM module {Path(args.output) / i['module']} (bits {i['bits']}): top-1 agreement with the fake-quant model "
              f"{100 * i['top1_agreement']:.2f}% on {i['test_images']} test images (max logit difference {i['max_abs_logit_diff']:.2e}); "
              f"{i['latency_ms']:.3f} ms measured now, {i['front_latency_ms']:.3f} ms on the front")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with eta's one-line errors: ``eta: error: <what>`` naming the argument, exit code 2 (no usage dump)."""

    def error(self, message: str):
        verb = self.prog.removeprefix("eta").strip()
        self.exit(2, f"eta: error: {verb + ': ' if verb else ''}{message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eta", description="Turn a trained teacher into faster students, chosen on measured latency.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, space_help="search space YAML, or an existing run directory"):
        p.add_argument("space", help=space_help)
        p.add_argument("--name", help="run name (default: the space's name)")
        p.add_argument("--runs-dir", default="runs", help="where runs live (default: ./runs)")
        p.add_argument("--force", action="store_true", help="overwrite an existing run made from a different space")
        p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a local cluster")
        p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
        p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="W&B mode (default: the space's, offline)")
        p.add_argument("--wandb-project", help="W&B project")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def latency_flags(p):
        p.add_argument("--backend", choices=["tvm", "torch"], help="measure with TVM (default) or PyTorch")
        p.add_argument("--target", help="TVM target kind: llvm (the host CPU, default) or cuda; torch: cpu or cuda")
        p.add_argument("--schedules", choices=["tuned", "untuned"],
                       help="TVM: tune with MetaSchedule first (default for float spaces) or use TVM's untuned schedules")
        p.add_argument("--tune-trials", type=int, help="MetaSchedule trials per task to tune (0: TVM's untuned schedules)")
        p.add_argument("--deepen", action="store_true", help="with --tune-trials N: also tune the space's tasks that have "
                       "schedules already (shipped, other spaces) until each has had N trials")
        p.add_argument("--node-resource", help="measure on the Ray node holding this custom resource, e.g. latency:rpi4")

    p = sub.add_parser("search", help="run all phases (resumes a finished or interrupted run of the same name)")
    common(p)
    latency_flags(p)
    p.add_argument("--budgets", nargs="+", type=_budget_arg, help="latency budgets: fractions of the teacher (0.5) or ms ('2.5ms')")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="the laptop demo: digits, a small teacher eta trains itself, all phases")
    p.add_argument("--name", default=None)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--force", action="store_true")
    p.add_argument("--address")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--wandb", choices=["offline", "online", "disabled"])
    p.add_argument("--wandb-project")
    p.add_argument("--no-progress", action="store_true")
    latency_flags(p)
    p.set_defaults(func=cmd_demo)

    t = sub.add_parser("teacher", help="teacher commands").add_subparsers(dest="teacher_cmd", required=True, metavar="ACTION")
    p = t.add_parser("train", help="train the space's teacher (cached in the run) and report its test accuracy")
    common(p)
    p.add_argument("--out", help="also copy the trained weights here")
    p.add_argument("--rerun", action="store_true", help="train again even if the run has a teacher")
    p.set_defaults(func=cmd_teacher_train)

    for phase, verb, text in (
        ("pretrain", "pretrain", "phase 1: block-wise distillation of every candidate operator (Ray tasks)"),
        ("solve", "solve", "phase 2: proxy accuracy of sampled students, MLP predictor, Gekko INLP per budget"),
        ("finetune", "finetune", "phase 3: finetune the selected students with elastic resolution, measure, build the front"),
    ):
        p = sub.add_parser(verb, help=text)
        common(p)
        again = p.add_mutually_exclusive_group()
        again.add_argument("--rerun", action="store_true", help="run this phase again even if it finished")
        if phase == "finetune":
            again.add_argument("--remeasure", action="store_true",
                               help="keep the finetuned students; tune what their networks still lack (tasks left untried by "
                                    "latency.tune.max_minutes) and time again what changed, then rebuild the front")
        p.set_defaults(func=_phase_cmd(phase))

    lat = sub.add_parser("latency", help="latency lookup tables").add_subparsers(dest="latency_cmd", required=True, metavar="ACTION")
    p = lat.add_parser("build", help="measure every operator of the space (and the teacher) on the target; cached and reused")
    common(p)
    latency_flags(p)
    p.add_argument("--rerun", action="store_true", help="re-read the table and re-fit the calibration even if the phase finished")
    p.set_defaults(func=_phase_cmd("latency"))

    p = lat.add_parser("validate", help="compile random whole students, compare with the table's sums, store the calibration")
    common(p)
    latency_flags(p)
    p.add_argument("--students", type=int, default=50, help="random students to compile end to end (default 50)")
    p.add_argument("--seed", type=int, help="which random students (default: the space's seed)")
    p.add_argument("--plot", help="also save a predicted-vs-measured scatter plot here (.png)")
    p.set_defaults(func=cmd_latency_validate)

    p = sub.add_parser("pareto", help="print the Pareto front of a finished run")
    p.add_argument("run", help="run directory, e.g. runs/digits")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("export", help="write the best student within a latency limit, loadable with plain PyTorch")
    p.add_argument("run", help="run directory")
    p.add_argument("--max-latency-ms", type=float, help="latency limit (default: the most accurate student)")
    p.add_argument("--resolution", type=int, help="only students at this input size")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--int", action="store_true", help="also compile a quantized student as one integer TVM module, checked and timed")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "gekko", "matplotlib", "PIL", "urllib3", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # a terminated search unwinds like Ctrl-C: locks and Ray released
    try:
        return args.func(args)
    except EtaError as err:
        print(f"eta: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated; Ray re-raises it as a plain KeyboardInterrupt)
        if isinstance(err, Terminated) or _terminated.is_set():
            print("eta: terminated (SIGTERM); finished work is on disk, run the same command again to resume", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("eta: interrupted; finished work is on disk, run the same command again to resume", file=sys.stderr)
        return 130


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so the command stops as it would on Ctrl-C.

    A KeyboardInterrupt, because that is what Ray's waits let through (they turn any other exception
    raised by a signal handler into a SystemError); ``_terminated`` remembers which signal it was.
    """


_terminated = threading.Event()


def _stop_on_sigterm(signum, frame):
    _terminated.set()
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
