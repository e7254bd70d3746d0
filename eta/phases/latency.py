"""Phase ``latency``: the space's latency table, its calibration against whole networks, the teacher's latency.

Every distinct (operator, input shape, bit-width) the space can produce, plus the teacher's stem,
head and blocks, is a :class:`~eta.latency.table.Workload` measured once on the target and cached
in a table shared by every search of that target. A few whole networks (the teacher and random
students) are compiled end to end to fit the calibration (HAO's latency ≈ a·Σ table + b, with the
terms cross-validation keeps), which turns the table into the solver's additive latency model.
The phase runs before any training, so an infeasible budget stops a search at once.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import families
from ..arch import OpSpec, arch_to_str
from ..bound import BoundSpace
from ..errors import EtaError
from ..raycluster import nodes_holding
from ..files import read_json, write_json
from ..latency.backends import schedule_policy, uses_schedules
from ..latency.calibrate import Calibration, fit_rows
from ..latency.measurer import Measurer
from ..latency.protocol import Protocol
from ..latency.table import LatencyTable, Workload, workload_signature
from ..latency.tuning import tasks_to_tune_further, tune_space
from ..mixed_precision import resource_limits
from ..optimize import InfeasibleBudget, SearchProblem
from ..plots import plot_calibration
from ..quant.qop import quantize_operator
from ..records import LatencyInfo
from ..student import latency_network
from ..runs import Run
from .context import PhaseContext

log = logging.getLogger(__name__)

NAME = "latency"


# --- what the space measures ------------------------------------------------------------------------
def measurer_protocol(space) -> Protocol:
    return Protocol.of(space.latency)


def measurer(space) -> Measurer:
    """Where and how ``space`` measures (on the Ray node its ``latency.node_resource`` names, if any)."""
    cfg = space.latency
    return Measurer.create(cfg.backend, cfg.target, measurer_protocol(space),
                           schedule_policy(cfg.backend, cfg.tuned, cfg.torch_compile), cfg.node_resource)


def tune(space, m: Measurer, table: LatencyTable, workloads: list[Workload], *, name: str | None = None, progress: bool = True) -> dict | None:
    """Tune the workloads' MetaSchedule tasks the target's database lacks, under the space's budget (a no-op
    for untuned tables). Runs on the measuring node when one is named; returns the tuning summary."""
    import ray

    if not uses_schedules(m.schedule):
        return None
    cfg = space.latency.tune
    nodes = None
    if cfg is not None and cfg.nodes and ray.is_initialized():  # outside a Ray session (a benchmark, say) the few tasks left are tuned here
        count = nodes_holding(cfg.nodes)
        if count == 0:  # checked before anything is built: a misnamed resource is an error even with nothing to tune
            raise EtaError(f"latency.tune.nodes: no node of the Ray cluster holds the resource '{cfg.nodes}'")
        nodes = (cfg.nodes, count)
    pairs = [(w.factory(), tuple(w.input_shape)) for w in workloads]  # float and integer kernels alike
    if not pairs:
        return None
    kw = dict(trials_per_task=space.latency.trials_per_task, total_trials=cfg.total_trials, population=cfg.population,
              max_seconds=60 * cfg.max_minutes if cfg.max_minutes else None, run=name, deepen=cfg.deepen)
    if not m.node_resource and not cfg.deepen:  # compiled here first: what has every schedule is built, the rest says its tasks
        kw["known"] = table.tuning_tasks(workloads, progress=progress, retuning=retuning(space, table, name))
    if nodes is not None:
        kw["nodes"] = nodes
    if m.node_resource:
        task = ray.remote(_tune_on_node).options(num_cpus=1, resources={m.node_resource: 1})
        summary = ray.get(task.remote(pairs, m.target, str(table.database_dir), kw))
    else:
        summary = tune_space(pairs, m.target, table.database_dir, progress=progress, **kw)
    log.info("tuning %s: %d distinct tasks (%d tuned before), %d trials in %.0f s (%s)", name or summary.run, summary.distinct,
             summary.already_tuned, summary.trials_run, summary.seconds, summary.stopped)
    out = summary.to_dict()
    out.pop("tasks", None)
    return out


def retuning(space, table: LatencyTable, name: str | None) -> frozenset[str]:
    """The tasks the tuning run ``name`` will tune further when resumed under the space's budget: a compile before
    tuning leaves the modules that use one, which tuning would otherwise make it build twice."""
    cfg = space.latency.tune
    if name is None or not uses_schedules(table.provenance["schedule"]) or (cfg is not None and cfg.deepen):
        return frozenset()
    return tasks_to_tune_further(table.database_dir, name, trials_per_task=space.latency.trials_per_task,
                                 total_trials=cfg.total_trials if cfg is not None else None)


def table_run(workloads: list[Workload]) -> str:
    """The name of the tuning run of a space's table (its entries, teacher and calibration networks)."""
    return f"space {space_key(workloads)}"


def front_run(workloads: list[Workload]) -> str:
    """The name of the tuning run of a front's networks: by the networks, not by the tasks found (a compile pass can
    find them otherwise, and a resumed run would not find itself)."""
    return f"front {space_key(workloads)}"


def _tune_on_node(pairs, target, database_dir, kw):
    return tune_space(pairs, target, database_dir, progress=False, **kw)


def phase_measurer(ctx: PhaseContext, info: LatencyInfo) -> Measurer:
    """The measurer a finished latency phase used (its backend, target and schedule policy), for the later phases."""
    return Measurer(info.backend, info.target, info.device, measurer_protocol(ctx.space), info.schedule, ctx.space.latency.node_resource)


def opened_table(ctx: PhaseContext, info: LatencyInfo | None = None) -> tuple[Measurer, LatencyTable]:
    """The space's measurer and its shared table, checked against this machine (entries from another are re-measured).

    With ``info`` (a finished latency phase), the measurer is the one that phase used: later phases
    measure with the same backend, target and schedule policy as the table their choices came from.
    """
    m = measurer(ctx.space) if info is None else phase_measurer(ctx, info)
    table = m.open_table()
    tolerance = ctx.space.latency.drift_tolerance
    if tolerance is not None:
        table.check_drift(space_workloads(ctx.bound), m.executor(), tolerance=tolerance)
    return m, table


def _operator_signature(spec: OpSpec, module) -> str:
    return workload_signature(str(spec.with_bits(32)), module)


def _at_bits(module, bits: int, input_shape: tuple):
    """The module as it runs at ``bits``: itself in float, quantized (on random data: latency depends on shapes) below."""
    if bits == 32:
        return module
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    return quantize_operator(module, bits, [x])


def block_input_shape(bound: BoundSpace, block: int, batch: int, width: float = 1.0) -> tuple:
    return (batch, *bound.thinned_shapes[float(width)][block][0])


def _stem_head_workloads(bound: BoundSpace, width: float, batch: int) -> list[Workload]:
    stem, head = bound.stem(width), bound.head(width)
    return [Workload(workload_signature("stem", stem), lambda: stem, bound.input_shape(batch=batch)),
            Workload(workload_signature("head", head), lambda: head, (batch, *bound.thinned_shapes[float(width)][-1][1]))]


def space_workloads(bound: BoundSpace) -> list[Workload]:
    """The stem, the head (at every interface width), and every operator of every block at its bit-width (each distinct one once)."""
    batch = bound.space.latency.batch_size
    out = [w for width in sorted({1.0, *bound.widths}, reverse=True) for w in _stem_head_workloads(bound, width, batch)]
    seen = set()
    for b, opts in enumerate(bound.options):
        for spec in opts:
            if not families.get(spec.family).costs_latency:
                continue
            module = bound.operator(b, spec)
            shape = block_input_shape(bound, b, batch, spec.width)
            key = (_operator_signature(spec, module), shape, spec.bits)
            if key not in seen:
                seen.add(key)
                out.append(Workload(key[0], (lambda m=module, bits=spec.bits, s=shape: _at_bits(m, bits, s)), shape, spec.bits))
    return out


def option_latency_matrix(bound: BoundSpace, table: LatencyTable) -> tuple[float, list[np.ndarray]]:
    """(stem + head ms, per-block ms of each option) read from the table; operators that cost nothing are 0.

    Narrower interface widths have a cheaper stem and head: the difference to the teacher's goes into
    each block-0 option of that width, so a student's latency stays base + Σ options.
    """
    batch = bound.space.latency.batch_size
    stem_head = {}
    for width in sorted({1.0, *bound.widths}):
        ms = [table.get(w.signature, w.input_shape, 32) for w in _stem_head_workloads(bound, width, batch)]
        if None in ms:
            raise EtaError(f"latency table {table.path} lacks the stem or head entry: run 'eta latency build' first")
        stem_head[width] = float(sum(ms))
    per_block = []
    for b, opts in enumerate(bound.options):
        row = []
        for spec in opts:
            if not families.get(spec.family).costs_latency:
                row.append(0.0)
                continue
            ms = table.get(_operator_signature(spec, bound.operator(b, spec)), block_input_shape(bound, b, batch, spec.width), spec.bits)
            if ms is None:
                raise EtaError(f"block {b} operator {spec}: no executable latency entry in {table.path} "
                               f"(bit-width {spec.bits} not executable on this target?)")
            row.append(float(ms))
        per_block.append(np.array(row))
    per_block[0] = per_block[0] + np.array([stem_head[s.width] - stem_head[1.0] for s in bound.options[0]])
    return stem_head[1.0], per_block


def option_masks(options) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block, which options cost no latency (identity) and which run as integer kernels (bits < 32).

    ``options`` holds OpSpecs or their strings (as ``latency.json`` stores them).
    """
    specs = [[OpSpec.parse(o) if isinstance(o, str) else o for o in opts] for opts in options]
    return ([np.array([not families.get(s.family).costs_latency for s in opts]) for opts in specs],
            [np.array([s.bits < 32 for s in opts]) for opts in specs])


def space_key(workloads: list[Workload]) -> str:
    """Names the set of table entries a space uses: its calibration is stored in the table under this key."""
    keys = sorted(LatencyTable.key(w.signature, w.input_shape, w.bits) for w in workloads)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


# --- calibration -----------------------------------------------------------------------------------
def calibration_archs(bound: BoundSpace, n_students: int, seed: int, stored: dict | None = None) -> list[tuple]:
    """The teacher (when it is a choice of the space) and ``n_students`` distinct random students.

    Students a stored calibration already measured come first, so a later call with the same or
    fewer students re-uses them from the table instead of compiling new ones.
    """
    archs = [tuple(c) for c in (stored or {}).get("choices", [])]
    tc = bound.teacher_choices()
    if tc is not None and tc not in archs:
        archs.insert(0, tc)
    want = n_students + (tc is not None)
    rng = np.random.default_rng(seed)
    while len(archs) < want and len(archs) < bound.space_size():
        c = bound.random_choices(rng)
        if c not in archs:
            archs.append(c)
    return archs


def model_workload(bound: BoundSpace, model, resolution: int | None = None) -> Workload:
    """Any whole network (a width-scaled teacher, a pruned one) at one resolution of the space."""
    return Workload(workload_signature("network", model), lambda m=model: m, bound.input_shape(resolution, bound.space.latency.batch_size))


def network_workload(bound: BoundSpace, arch, resolution: int | None = None) -> Workload:
    """A whole network (the teacher when ``arch`` is None) at one resolution, float or integer as its bits say."""
    return model_workload(bound, bound.teacher if arch is None else latency_network(bound, arch, resolution), resolution)


def calibration_networks(bound: BoundSpace, table: LatencyTable, n_students: int, seed: int, key: str) -> tuple[list, list[Workload]]:
    """(choices, whole-network workloads) of the networks ``calibrate`` measures for the space named ``key``."""
    archs = calibration_archs(bound, n_students, seed, table.calibrations.get(key))
    return archs, [network_workload(bound, bound.arch(c)) for c in archs]


def calibrate(bound: BoundSpace, table: LatencyTable, base: float, per_block: list[np.ndarray], *, n_students: int, seed: int,
              progress: bool = True, executor=None, workloads: list[Workload] | None = None) -> dict:
    """Compile the teacher and random students end to end; fit measured ≈ a·Σtable (+ terms) + b.

    The fit is stored in the table under the space's key; a calibration with at least as many
    students there (``eta latency validate`` measures 50) is re-used, not re-measured.
    """
    key = space_key(workloads or space_workloads(bound))
    stored = table.calibrations.get(key)
    archs, nets = calibration_networks(bound, table, n_students, seed, key)
    table.measure_many(nets, desc="latency calibration (whole networks)", progress=progress, executor=executor)
    identity, integer = option_masks(bound.options)
    rows = []
    for c, w in zip(archs, nets):
        e = table.entry(w.signature, w.input_shape, 32)
        rows.append({"arch": arch_to_str(bound.arch(c)), "choices": list(c),
                     "table_sum_ms": float(base + sum(per_block[b][j] for b, j in enumerate(c))),
                     "int_table_ms": float(sum(per_block[b][j] for b, j in enumerate(c) if integer[b][j])),
                     "operators": int(sum(not identity[b][j] for b, j in enumerate(c))),
                     "measured_ms": float(e["median_ms"]), "spread": float(e["spread"])})
    out = fit_rows(rows, base, per_block, identity, integer)
    out["space_key"] = key
    if len(rows) > len((stored or {}).get("choices", [])):
        table.set_calibration(key, {k: v for k, v in out.items() if k != "students"} | {"choices": [r["choices"] for r in rows],
                                   "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return out


def phase_workloads(bound: BoundSpace, table: LatencyTable, students: int, seed: int) -> tuple[list, list, list]:
    """What the phase times: (the table's entries, the teacher at every resolution, the calibration networks)."""
    workloads = space_workloads(bound)
    teacher = [network_workload(bound, None, r) for r in bound.space.resolutions]
    _, calibration = calibration_networks(bound, table, students, seed, space_key(workloads))
    return workloads, teacher, calibration


def compile_table_ahead(ctx: PhaseContext, workers: int) -> int:
    """Start compiling what this phase will time, ``workers`` at a time, when it compiles here (not on a measuring
    node); returns how many modules were started. Latency depends on the networks' structure, not their weights,
    so this can run while the teacher trains; the phase then takes the compiled modules."""
    if ctx.space.latency.node_resource or workers < 1:
        return 0
    table = measurer(ctx.space).open_table()  # no drift check: that times entries, and nothing is timed beside a compile
    workloads, teacher, calibration = phase_workloads(ctx.bound, table, ctx.space.latency.calibration_students, ctx.space.seed)
    return table.compile_ahead(workloads + teacher + calibration, workers, retuning(ctx.space, table, table_run(workloads)))


def table_and_calibration(ctx: PhaseContext, students: int, seed: int):
    """Tune (a tuned table), measure the space's entries not cached yet, read the option latencies, calibrate on
    whole networks. The table's ``summary`` says what measuring cost, its ``tuning`` what tuning did."""
    m, table = opened_table(ctx)
    executor = m.executor()
    workloads, teacher, calibration = phase_workloads(ctx.bound, table, students, seed)
    # one tuning run (and one compile round) for everything the phase times
    table.tuning = tune(ctx.space, m, table, workloads + teacher + calibration, name=table_run(workloads), progress=ctx.progress)
    log.info("latency table: %d entries on %s (%s, %s), cached in %s", len(workloads), m.device, m.backend, m.schedule, table.path)
    table.measure_many(workloads, desc="latency table", progress=ctx.progress, executor=executor)
    base, per_block = option_latency_matrix(ctx.bound, table)
    cal = calibrate(ctx.bound, table, base, per_block, n_students=students, seed=seed, progress=ctx.progress, executor=executor,
                    workloads=workloads)
    return m, table, executor, workloads, base, per_block, cal


def network_latency(bound: BoundSpace, table: LatencyTable, arch, executor=None, m: Measurer | None = None) -> dict[str, float]:
    """End-to-end latency of the teacher (``arch`` None) or a student at every resolution, cached in the table."""
    return networks_latency(bound, table, [arch], executor, m)[0]


def front_workloads(bound: BoundSpace, archs: list) -> list[list[Workload]]:
    """Per network (the teacher for None), its whole-network workloads at every resolution of the space."""
    return [[network_workload(bound, arch, r) for r in bound.space.resolutions] for arch in archs]


def compile_networks_ahead(ctx: PhaseContext, info: LatencyInfo, archs: list, workers: int) -> int:
    """Start compiling the networks ``networks_latency`` will time, ``workers`` at a time, when they are compiled here
    (not on a measuring node); returns how many modules were started. For work that runs meanwhile (finetuning the
    students) and leaves ``workers`` cores idle: on busy cores compiling only slows that work down."""
    if ctx.space.latency.node_resource or workers < 1:
        return 0
    table = phase_measurer(ctx, info).open_table()
    workloads = [w for ws in front_workloads(ctx.bound, archs) for w in ws]
    return table.compile_ahead(workloads, workers, retuning(ctx.space, table, front_run(workloads)))


def networks_latency(bound: BoundSpace, table: LatencyTable, archs: list, executor=None, m: Measurer | None = None,
                     progress: bool = False) -> list[dict[str, float]]:
    """End-to-end latency of each network (the teacher for None) at every resolution, cached in the table.

    Like every table entry, each network is compiled and timed twice and the faster kept (both are
    in its entry): a burst of load during one measurement must not become the front's figure. On a
    tuned table (``m`` given) the tasks of all the networks at every resolution are tuned first, in one
    run: tasks the networks share are tuned once, and the budget goes where the scheduler finds gains.
    """
    nets = [dict(zip(bound.space.resolutions, ws)) for ws in front_workloads(bound, archs)]
    workloads = [w for n in nets for w in n.values()]
    if m is not None and workloads:
        tune(bound.space, m, table, workloads, name=front_run(workloads), progress=progress)
    table.measure_many(workloads, desc="whole-network latency", progress=progress, executor=executor)
    return [{str(r): float(table.get(w.signature, w.input_shape, 32)) for r, w in n.items()} for n in nets]


# --- the solver's view -------------------------------------------------------------------------------
def search_problem(bound: BoundSpace, info: LatencyInfo, layers=(), *, activation: str = "tanh", output: str = "linear",
                   option_penalty: list | None = None) -> SearchProblem:
    """The solver's problem: calibrated option latencies, the space's size/BOPs limits and, once there is
    one, the accuracy predictor's ``layers`` (and, in mixed precision, the modelled drops)."""
    identity, integer = option_masks(info.options)
    base, per_block = Calibration.from_dict(info.calibration).additive(info.base_ms, info.option_ms, identity, integer)
    return SearchProblem(option_latency=per_block, layers=list(layers), activation=activation, output=output, base_latency=base,
                         option_penalty=[np.asarray(r, float) for r in option_penalty] if option_penalty is not None else None,
                         limits=resource_limits(bound), partitions=[k for _, k in bound.partitions()] if len(bound.widths) > 1 else None)


def budgets_ms(space, info: LatencyInfo) -> list[float]:
    teacher_ms = info.teacher_latency(space.data.resolution)
    return [b.to_ms(teacher_ms) for b in space.parsed_budgets()]


def check_budgets(bound: BoundSpace, info: LatencyInfo) -> None:
    """Fail in one line, before any training, when a budget is below the fastest student."""
    problem = search_problem(bound, info)
    space = bound.space
    teacher_ms = info.teacher_latency(space.data.resolution)
    for raw, ms in zip(space.parsed_budgets(), budgets_ms(space, info)):
        try:
            problem.check_budget(ms)
        except InfeasibleBudget:
            fastest = problem.min_latency()
            raise EtaError(f"budget {raw} = {ms:.3f} ms is infeasible: the fastest student of this space takes {fastest:.3f} ms "
                           f"({fastest / teacher_ms:.2f}x the teacher's {teacher_ms:.3f} ms)") from None


# --- the phase ---------------------------------------------------------------------------------------
def read_info(run: Run) -> LatencyInfo:
    """The run's ``latency.json`` as a record; one line naming the file when it is not one."""
    data = read_json(run.latency_info)
    try:
        return LatencyInfo.from_dict(data)
    except (KeyError, TypeError, AttributeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else f"expected an object, got {type(data).__name__}"
        raise EtaError(f"{run.latency_info}: not a latency record of this eta ({what})") from None


def load(ctx: PhaseContext) -> LatencyInfo:
    info = read_info(ctx.run)
    check_budgets(ctx.bound, info)
    return info


def run(ctx: PhaseContext) -> tuple[LatencyInfo, dict, bool]:
    """(the record, the manifest's note, whether the figures changed from the run's previous ones)."""
    space, bound = ctx.space, ctx.bound
    with ctx.latency_session():
        m, table, executor, workloads, base, per_block, cal = table_and_calibration(ctx, space.latency.calibration_students, space.seed)
        teacher = network_latency(bound, table, None, executor, m)
    info = LatencyInfo(backend=m.backend, schedule=m.schedule, target=m.target, device=m.device, table=str(table.path), base_ms=base,
                       option_ms=[r.tolist() for r in per_block], options=[[str(s) for s in opts] for opts in bound.options],
                       calibration=cal, teacher_ms=teacher, io={"in_chans": bound.in_chans, "num_classes": bound.num_classes})
    ctx.run.latency_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(table.path, ctx.run.latency_table_copy)
    previous = read_info(ctx.run) if ctx.run.latency_info.exists() else None
    write_json(ctx.run.latency_info, info.to_dict())
    changed = previous is not None and any(getattr(previous, k) != getattr(info, k)
                                           for k in ("option_ms", "calibration", "teacher_ms", "base_ms"))
    with ctx.tracker(NAME) as tr:
        tr.summary(teacher_ms=teacher[str(space.data.resolution)], calibration_a=cal["a"], calibration_b=cal["b"], entries=len(workloads))
        tr.table("latency/calibration", ["arch", "table_sum_ms", "measured_ms"],
                 [[r["arch"], r["table_sum_ms"], r["measured_ms"]] for r in cal["students"]])
    check_budgets(bound, info)
    return info, {"entries": len(workloads), "measuring": table.summary, "tuning": table.tuning}, changed


def validate(ctx: PhaseContext, students: int = 50, seed: int | None = None, plot: Path | None = None) -> dict:
    """Compile ``students`` random whole students, compare with the table's sums, store the calibration.

    The calibration lands in the shared table (under this space's key), where every later search of
    the space finds it.
    """
    with ctx.latency_session():
        m, table, _, _, _, _, cal = table_and_calibration(ctx, students, ctx.space.seed if seed is None else seed)
    report = {"backend": m.backend, "schedule": m.schedule, "device": m.device, "table": str(table.path), **cal}
    write_json(ctx.run.latency_validation, report)
    if plot:
        plot_calibration(cal, Path(plot), f"{ctx.space.name}: {m.backend} ({m.schedule}) on {m.device}")
    return report
