"""Tuning at the scale of a space: every workload's MetaSchedule tasks, deduplicated, under one budget.

Tuning each table entry on its own (``tvm_backend.tune`` per module, a fixed number of trials
each) costs about two hours per space on 2 cores, and spends as much on a 1x1 convolution of
0.01 ms as on the block that dominates the network. Here the tasks of every table entry and
calibration network are extracted, deduplicated by structural hash within the space and against
the target's database (shared by every space), weighted by how often they occur, and tuned in
one ``tune_tasks`` call whose gradient task scheduler (Ansor's) gives trials to the tasks whose
improvement lowers the weighted total most.

The database directory is resumable: records are appended as candidates are measured, and
``eta_schedules.json`` counts the trials each task and each run has spent, so an interrupted run
continues with the budget it has left, and a larger budget later adds to what was spent.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EtaError, first_line
from ..locks import timing_device, timing_lock
from . import schedules
from .tvm_backend import (build_candidate, check_target, check_tuning_runtime, extract_tasks, load_tensor_intrinsics,
                          lower_for_tuning, to_relax, workload_hash)

log = logging.getLogger(__name__)


@dataclass
class SpaceTask:
    """One distinct tuning task of a space: its workload hash, a name, and how often the space runs it."""

    hash: str
    name: str
    weight: int
    mod: object  # the TIR IRModule MetaSchedule tunes (ExtractedTask.dispatched[0]); None until ``materialize``
    target: object
    workload: int = 0  # index of a workload that runs it


@dataclass
class TuningSummary:
    """What a ``tune_space`` call found and did."""

    database_dir: str
    tasks_found: int  # tasks of all workloads, counted once per workload
    distinct: int  # distinct workloads among them
    already_tuned: int  # distinct tasks that had records before this run began (another space, an earlier run)
    tuned: int  # tasks this call gave trials to
    trials_run: int  # trials measured in this call
    trials_spent: int  # trials this run has measured over all its calls
    trials_budget: int  # the run's total budget
    seconds: float
    extract_s: float
    stopped: str  # "budget" (spent), "done" (every task at its cap), "time" (max_seconds), "nothing to tune"
    run: str = ""
    tasks: list = field(default_factory=list)  # per task: hash, name, weight, trials (all runs)
    nodes: list = field(default_factory=list)  # the Ray nodes that tuned a share (tune_space's ``nodes``)

    def to_dict(self) -> dict:
        return asdict(self)


def _extracted(module, input_shape, tvm_target) -> list:
    try:
        return extract_tasks(lower_for_tuning(to_relax(module, input_shape)), tvm_target)
    except EtaError:
        raise
    except Exception as err:  # TVM raises many types; a stack trace follows the first line
        raise EtaError(f"MetaSchedule tuning of {type(module).__name__} failed: {first_line(err)}") from None


def space_tasks(workloads, target: dict, known: list | None = None, tuned: Collection[str] = ()) -> tuple[list[SpaceTask], int]:
    """(distinct tasks with summed weights, number of tasks found) of ``(module, input_shape)`` workloads.

    ``known``: per workload, its tasks as the compile pass found them (``compile_cache.ModuleTask``) or None;
    a workload whose tasks are all in ``tuned`` is not imported again, its tasks come without a TIR
    module (``materialize`` adds it if one is to be tuned after all).
    """
    import tvm

    tvm_target = tvm.target.Target(target)
    distinct: dict[str, SpaceTask] = {}
    found = 0
    tuned = set(tuned)
    for i, workload in enumerate(workloads):
        listed = known[i] if known is not None else None
        if listed is not None and all(t.scheduled or t.hash in tuned for t in listed):
            tasks = [(t.hash, t.name, t.weight, None) for t in listed if not t.scheduled]
        else:
            tasks = [(workload_hash(t), str(t.task_name), int(t.weight), t) for t in _extracted(workload[0], tuple(workload[1]), tvm_target)
                     if not (t.mod.attrs is not None and t.mod.attrs.get("tirx.is_scheduled", False))]  # a library dispatch
        for h, name, weight, task in tasks:
            found += 1
            if h in distinct:
                distinct[h].weight += weight
                if distinct[h].mod is None and task is not None:
                    distinct[h].mod, distinct[h].target, distinct[h].workload = task.dispatched[0], task.target, i
            else:
                distinct[h] = SpaceTask(h, name, weight, None if task is None else task.dispatched[0],
                                        None if task is None else task.target, i)
    return list(distinct.values()), found


def materialize(tasks: list[SpaceTask], workloads, target: dict) -> None:
    """Give each task that came without its TIR module (``space_tasks``'s ``known``) the module, from its workload."""
    import tvm

    missing = {t.workload for t in tasks if t.mod is None}
    by_hash = {t.hash: t for t in tasks}
    tvm_target = tvm.target.Target(target)
    for i in sorted(missing):
        for task in _extracted(workloads[i][0], tuple(workloads[i][1]), tvm_target):
            t = by_hash.get(workload_hash(task))
            if t is not None and t.mod is None:
                t.mod, t.target = task.dispatched[0], task.target


def timed_alone(rt_mod, device, evaluator_config, repeated_args):
    """MetaSchedule's candidate timing, under the machine-wide timing lock of its device: a tuning run neither
    disturbs nor is disturbed by another process's timings (it runs in MetaSchedule's runner worker)."""
    from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

    with timing_lock(timing_device(device), "tuning"):
        return default_run_evaluator(rt_mod, device, evaluator_config, repeated_args)


def _run_key(hashes) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()[:16]


def tasks_to_tune_further(database_dir, run: str, *, trials_per_task: int | None = None,
                          total_trials: int | None = None) -> frozenset[str]:
    """The tasks an interrupted run ``run`` will tune again when resumed with this budget (``tune_space``'s
    rule: its own tasks, below the cap, design space not used up, while budget is left). Their schedules
    have records already but are about to change, so a module using one is compiled after tuning, not
    before it as well. Empty for a run the database has not seen."""
    state = schedules.read_state(database_dir) or {}
    record = state.get("runs", {}).get(run)
    if record is None:
        return frozenset()
    own, counts = record["tasks"], state.get("tasks", {})
    if total_trials is None:
        total_trials = trials_per_task * len(own) if trials_per_task is not None else record.get("total_trials", 0)
    if total_trials - int(record["trials_spent"]) <= 0:
        return frozenset()
    return frozenset(h for h in own if _wants_trials(counts.get(h, {}), trials_per_task))


def _wants_trials(count: dict, trials_per_task: int | None) -> bool:
    """Whether a task of a run's own gets more trials: its design space not used up (a reshape has one schedule),
    and below the cap."""
    return not count.get("exhausted", False) and (trials_per_task is None or int(count.get("trials", 0)) < trials_per_task)


class _Stop(Exception):
    """Raised from the measure callback to end tuning early (time limit); the records so far stay."""


STOP_MESSAGE = "eta: tuning time limit reached"


def _callback(on_batch):
    """A MetaSchedule MeasureCallback calling ``on_batch(task_id, n_trials)`` after each measured batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Count(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            on_batch(int(task_id), len(measure_candidates))

    return _Count()


def _scheduler(weights: list[float], seed: int, alpha: float = 0.2, window: int = 3):
    """MetaSchedule's gradient task scheduler (Ansor's), joining each batch before choosing the next task.

    TVM's ``GradientBased`` sends every task's first batch to the runner before joining any, so
    nothing is committed to the database (nor counted) until all tasks have been searched once:
    an hour for a space of 94 tasks on 2 cores, all lost on an interruption, and each batch is
    timed while the next task's search loads the CPU. Here the last batch is joined first (its
    records are saved and counted at once, and it is timed with the CPU otherwise idle), then
    the next task is chosen as TVM does: each task once in turn, then the largest weighted
    gradient of the best latency over a window of batches (``alpha`` mixes in latency / batches).
    """
    import random

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class _GradientInOrder(PyTaskScheduler):
        def __init__(self):
            super().__init__()
            self.picked: int | None = None
            self.turn = 0
            self.best: dict[int, float] = {}
            self.history: dict[int, list[float]] = {}
            self.rng = random.Random(seed)

        def _join_last(self, outer) -> None:
            i, self.picked = self.picked, None
            if i is None or outer.tasks_[i].is_terminated:  # terminated when picked: nothing was sent
                return
            results = self.join_running_task(i)
            for r in results:
                secs = list(r.run_secs) if r.error_msg is None and r.run_secs else None
                ms = 1e3 * sorted(float(getattr(x, "value", x)) for x in secs)[len(secs) // 2] if secs else 1e9
                self.best[i] = min(self.best.get(i, 1e9), ms)
            if i in self.best:
                self.history.setdefault(i, []).append(self.best[i])

        def next_task_id(self) -> int:
            outer = self._outer()
            self._join_last(outer)
            alive = [i for i in range(len(outer.tasks_)) if not outer.tasks_[i].is_terminated]
            if not alive:
                return -1
            fresh = [i for i in alive if i >= self.turn]
            if fresh and self.turn < len(outer.tasks_):  # every task once, in order
                self.picked = fresh[0]
                self.turn = fresh[0] + 1
                return self.picked
            grads = []
            for i in alive:
                h = self.history.get(i, [])
                if h and h[-1] < 1e9:
                    g1 = (h[-1 - window] - h[-1]) / window if len(h) >= 1 + window else 0.0
                    grads.append((alpha * g1 + (1 - alpha) * h[-1] / len(h)) * weights[i])
                else:
                    grads.append(-1e9)  # no valid candidate yet: last
            top = max(grads)
            self.picked = alive[grads.index(top)] if top != min(grads) else self.rng.choice(alive)
            return self.picked

    return _GradientInOrder()


def _contexts(tasks: list[SpaceTask], work_dir: str, seed: int, num_threads: int, population: int):
    """One TuneContext per task, named uniquely (names repeat across modules; the logs are per name)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    names = [f"{t.name}_{t.hash[-6:]}" for t in tasks]
    # MetaSchedule's loggers print its task table to stdout at the level of its root logger (DEBUG when unset);
    # the table goes to <work_dir>/logs/ in full, the console gets warnings unless eta itself logs at DEBUG
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    out = []
    for t, name, logger, rand_state in zip(tasks, names, get_loggers_from_work_dir(work_dir, names), fork_seed(seed, n=len(tasks))):
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population)
        out.append(ms.TuneContext(mod=t.mod, target=t.target, space_generator="post-order-apply", search_strategy=strategy,
                                  task_name=name, logger=logger, rand_state=rand_state, num_threads=num_threads).clone())
    return out


def _tune_stored_modules(tasks: list[SpaceTask], database_dir) -> None:
    """Tasks whose workload the database holds already are tuned on the module stored there.

    The database keys a workload by structure, names aside; a trace found on another network's copy
    of it names that copy's blocks and would not replay on the stored module, which breaks the whole
    database's loading (seen when deepening a task first tuned for another network).
    """
    from .tvm_backend import opened_database

    if not (Path(database_dir) / schedules.WORKLOADS).is_file():
        return
    database = opened_database(database_dir)
    for t in tasks:
        if database.has_workload(t.mod):
            t.mod = database.commit_workload(t.mod).mod


def tune_space(workloads, target: dict, database_dir, *, total_trials: int | None = None, trials_per_task: int | None = None,
               num_trials_per_iter: int = 8, max_workers: int | None = None, population: int = 512, seed: int = 0,
               max_seconds: float | None = None, progress: bool = True, run: str | None = None,
               nodes: tuple[str, int] | None = None, only: Collection[str] | None = None, deepen: bool = False,
               known: list | None = None) -> TuningSummary:
    """Tune every distinct task of ``workloads`` (``(torch module, input shape)`` pairs) into ``database_dir``.

    ``total_trials``: the budget of the whole run, allocated across tasks by the gradient scheduler
    (default ``trials_per_task`` times the tasks to tune). ``trials_per_task``: a cap on any one task
    (over all calls). Tasks that had records before the run began are not tuned again. A run is
    named by its set of tasks (or ``run``); calling again resumes it with the budget left, or tops
    it up to a larger ``total_trials``. ``max_seconds`` ends it early, keeping what was measured.
    Small ``num_trials_per_iter`` spreads a small budget over many tasks (each task first gets one
    batch); MetaSchedule's default of 64 spent a 256-trial budget on a handful of tasks.

    ``nodes``: (a Ray custom resource, how many nodes hold it): the tasks to tune are dealt out to
    that many Ray tasks, one per node, each tuning its share under its share of the budget into a
    database of its own, merged here when it returns. ``only``: tune just these workload hashes.
    ``deepen``: tasks tuned before (by another space, a shipped database) are tuned too, until each
    has had ``trials_per_task`` trials: how a user spends more on schedules found with a small budget.
    ``known``: each workload's tasks where a compile pass found them already (see ``space_tasks``).
    """
    from tqdm.auto import tqdm
    from tvm.s_tir import meta_schedule as ms

    check_tuning_runtime()
    if total_trials is None and trials_per_task is None:
        raise EtaError("tuning needs a budget: total trials or trials per task")
    if (total_trials is not None and total_trials < 1) or (trials_per_task is not None and trials_per_task < 1):
        raise EtaError(f"tuning budget must be positive (total {total_trials}, per task {trials_per_task})")
    if deepen and trials_per_task is None:
        raise EtaError("deepening tuned schedules needs trials per task: how many trials each task should have had")
    check_target(target)
    database_dir = Path(database_dir)
    state = schedules.open_database(database_dir, target)
    load_tensor_intrinsics(target["kind"])
    t0 = time.perf_counter()
    tuned_before = schedules.tuned_hashes(database_dir)
    tasks, found = space_tasks(workloads, target, None if deepen else known, tuned_before)
    if only is not None:
        only = set(only)
        tasks = [t for t in tasks if t.hash in only]
    extract_s = time.perf_counter() - t0
    run_key = run or _run_key(t.hash for t in tasks)
    record = state["runs"].get(run_key)
    if record is None:
        record = {"tasks": sorted(t.hash for t in tasks if t.hash not in tuned_before), "trials_spent": 0,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # the run's own tasks: those it found untuned when it began, and any task nobody has tuned yet (a space that grew);
    # deepening: every task of the workloads
    own = set(record["tasks"]) | {t.hash for t in tasks if deepen or t.hash not in tuned_before}
    counts = state["tasks"]
    for t in tasks:
        counts.setdefault(t.hash, {"name": t.name, "trials": 0})["weight"] = t.weight

    def spent(t):
        return int(counts[t.hash]["trials"])

    record["tasks"] = sorted(own)
    # distinct tasks with records before the run began (deepening: before this call)
    before = sum(t.hash in tuned_before for t in tasks) if deepen else len(tasks) - len(own)
    if total_trials is not None:
        record["total_trials"] = int(total_trials)
    elif deepen:  # what this run spent, plus what each task lacks to reach the cap
        lacking = sum(max(0, trials_per_task - spent(t)) for t in tasks if t.hash in own and not counts[t.hash].get("exhausted"))
        record["total_trials"] = int(record["trials_spent"]) + lacking
    else:
        record["total_trials"] = trials_per_task * len(own)
    record["trials_per_task"] = trials_per_task
    state["runs"][run_key] = record
    schedules.write_state(database_dir, state)

    def open_space(t):  # a task whose design space MetaSchedule has used up (a reshape has one schedule) is done
        return not counts[t.hash].get("exhausted", False)

    eligible = [t for t in tasks if t.hash in own and _wants_trials(counts[t.hash], trials_per_task)]
    # the scheduler gives each task one batch in this order first: the least tuned first (a resumed run carries on
    # where it stopped), the most frequent first among equals (an interrupted first pass covers what the space runs most)
    eligible.sort(key=lambda t: (spent(t), -t.weight))
    left = record["total_trials"] - int(record["trials_spent"])
    if left > 0 and any(t.mod is None for t in eligible):  # an interrupted run's own tasks, tuned in part since
        materialize(eligible, workloads, target)

    def summary(trials_run, stopped, tuned=0):
        schedules.write_state(database_dir, state)
        return TuningSummary(str(database_dir), found, len(tasks), before, tuned, trials_run,
                             int(record["trials_spent"]), record["total_trials"], round(time.perf_counter() - t0, 1),
                             round(extract_s, 1), stopped, run_key,
                             [{"hash": t.hash, "name": t.name, "weight": t.weight, "trials": spent(t)} for t in tasks])

    if left <= 0 or not eligible:
        log.info("tuning %s: nothing to tune (%d distinct tasks, %d tuned before, budget left %d)", database_dir, len(tasks),
                 before, max(left, 0))
        return summary(0, "budget" if left <= 0 else "done" if own else "nothing to tune")
    # MetaSchedule caps every task at one number of trials in this call; a resumed task may pass its cap by what it spent before
    per_task = (trials_per_task - min(spent(t) for t in eligible)) if trials_per_task else left
    per_iter = min(num_trials_per_iter, per_task)
    if max_seconds is not None and any(spent(t) == 0 for t in eligible):  # a time limit may end the first pass: halve the
        per_iter = max(1, min(per_iter, per_task // 2))  # batch so it reaches twice as many tasks (a resumed pass keeps it whole)
    cores = int(target.get("num-cores") or os.cpu_count() or 1)
    this_run = {"trials": 0, "tasks": set(), "per_task": {}}
    bar = tqdm(total=left, desc=f"tuning {len(eligible)} tasks", unit="trial", disable=not progress, dynamic_ncols=True)

    def on_batch(task_id, n):
        t = eligible[task_id]
        asked = min(per_iter, per_task - this_run["per_task"].get(t.hash, 0), left - this_run["trials"])
        if n < asked:  # MetaSchedule had fewer new candidates than the batch asked for: nothing left to search
            counts[t.hash]["exhausted"] = True
        this_run["per_task"][t.hash] = this_run["per_task"].get(t.hash, 0) + n
        counts[t.hash]["trials"] = spent(t) + n
        record["trials_spent"] = int(record["trials_spent"]) + n
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        this_run["trials"] += n
        this_run["tasks"].add(t.hash)
        schedules.write_state(database_dir, state)  # after MetaSchedule committed the batch's records: resumable here
        bar.update(n)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            raise _Stop(STOP_MESSAGE)

    stopped = "budget"
    log.info("tuning %d of %d distinct tasks (%d found, %d tuned before) with %d trials, at most %d per task", len(eligible),
             len(tasks), found, before, left, per_task)
    # deepened tasks are tuned here, on the modules the database stores (a node's fresh database would tune its own copies)
    spread = nodes is not None and nodes[1] > 1 and len(eligible) > 1 and not deepen
    try:
        if spread:
            options = dict(num_trials_per_iter=num_trials_per_iter, max_workers=max_workers, population=population, seed=seed,
                           max_seconds=None if max_seconds is None else max(1.0, max_seconds - (time.perf_counter() - t0)))
            for share in tune_on_nodes(workloads, target, database_dir, eligible, left, per_task, nodes, options):
                for h, task in share["tasks"].items():
                    counts[h]["trials"] = int(counts[h]["trials"]) + task["trials"]
                    counts[h]["exhausted"] = counts[h].get("exhausted", False) or task["exhausted"]
                    this_run["tasks"].add(h)
                record["trials_spent"] = int(record["trials_spent"]) + share["trials"]
                this_run["trials"] += share["trials"]
                this_run.setdefault("nodes", []).append(share["node"])
                stopped = "time" if share["stopped"] == "time" else stopped
                schedules.write_state(database_dir, state)
                bar.update(share["trials"])
        else:
            _tune_stored_modules(eligible, database_dir)
            contexts = _contexts(eligible, str(database_dir), seed, cores, population)
            builder = ms.builder.LocalBuilder(max_workers=max_workers or cores, f_build=build_candidate)
            callbacks = list(ms.MeasureCallback.create("default")) + [_callback(on_batch)]
            ms.tune.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in eligible], work_dir=str(database_dir),
                               max_trials_global=left, max_trials_per_task=per_task, num_trials_per_iter=per_iter,
                               builder=builder, runner=ms.runner.LocalRunner(f_run_evaluator=timed_alone),
                               database=ms.database.JSONDatabase(work_dir=str(database_dir)),
                               cost_model="xgb", measure_callbacks=callbacks,
                               task_scheduler=_scheduler([float(t.weight) for t in eligible], seed))
    except Exception as err:  # MetaSchedule surfaces TVM and Python errors of many types; _Stop arrives wrapped
        if STOP_MESSAGE not in str(err):
            bar.close()
            schedules.write_state(database_dir, state)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise EtaError(f"MetaSchedule tuning into {database_dir} failed: {reason}") from None
        stopped = "time"
    bar.close()
    if stopped != "time" and record["trials_spent"] < record["total_trials"]:
        stopped = "done"
    out = summary(this_run["trials"], stopped, len(this_run["tasks"]))
    out.nodes = this_run.get("nodes", [])
    log.info("tuned %d tasks with %d trials%s in %.0f s (%s)", out.tuned, out.trials_run,
             f" on {len(out.nodes)} nodes" if spread else "", out.seconds, stopped)
    untried = [t for t in tasks if t.hash in own and spent(t) == 0 and open_space(t)]
    if untried:
        log.warning("tuning: %d of %d tasks have no tuned schedule yet (stopped: %s) and run TVM's untuned fallback, often "
                    "several times slower; tuning the same networks again resumes with the budget left (a space's table: "
                    "`eta latency build SPACE --rerun`; the front's networks: `eta finetune RUN --remeasure`; latency.tune sets the budget)",
                    len(untried), len(tasks), stopped)
    return out


def tune_on_nodes(workloads, target: dict, database_dir: Path, eligible: list[SpaceTask], budget: int, per_task: int,
                  nodes: tuple[str, int], options: dict):
    """Deal ``eligible`` out to one Ray task per node holding ``nodes[0]`` (round robin: they come sorted by need)
    with a share of ``budget`` each; yield each node's result as its records are merged into ``database_dir``."""
    import ray

    from ..raycluster import completed

    resource, n = nodes
    n = min(n, len(eligible))
    groups = [eligible[i::n] for i in range(n)]
    budgets = [budget * len(g) // len(eligible) for g in groups]
    for i in range(budget - sum(budgets)):
        budgets[i % n] += 1
    task = ray.remote(tune_share).options(num_cpus=1, resources={resource: 1}, max_retries=1)
    shared = ray.put(list(workloads))
    refs = [task.remote(shared, target, [t.hash for t in g], b, per_task, options) for g, b in zip(groups, budgets) if b > 0]
    log.info("tuning %d tasks on %d nodes holding %s (%s trials)", len(eligible), len(refs), resource, "/".join(map(str, budgets)))
    for _, share in completed(refs, desc="tuning (nodes)", total=len(refs), progress=False):
        merged = schedules.merge_lines(share.pop("workloads"), share.pop("records"), database_dir)
        log.info("node %s: %d trials on %d tasks, %d records merged (%s)", share["node"][:12], share["trials"], len(share["tasks"]),
                 merged, share["stopped"])
        yield share


def tune_share(workloads, target: dict, hashes: list[str], budget: int, per_task: int, options: dict) -> dict:
    """Ray task body: tune ``hashes`` of ``workloads`` into a fresh database here; return its lines and counts."""
    import ray

    with tempfile.TemporaryDirectory(prefix="eta-tune-") as tmp:
        out = tune_space(workloads, target, tmp, total_trials=budget, trials_per_task=per_task, only=hashes, progress=False,
                         run="share", **options)
        files = {name: (Path(tmp) / name).read_text() if (Path(tmp) / name).is_file() else ""
                 for name in (schedules.WORKLOADS, schedules.RECORDS)}
        counts = (schedules.read_state(tmp) or {"tasks": {}})["tasks"]
    tasks = {h: {"trials": int(t["trials"]), "exhausted": bool(t.get("exhausted", False))}
             for h, t in counts.items() if h in set(hashes) and int(t["trials"]) > 0}
    return {"workloads": files[schedules.WORKLOADS], "records": files[schedules.RECORDS], "tasks": tasks,
            "trials": out.trials_run, "stopped": out.stopped, "node": ray.get_runtime_context().get_node_id()}
