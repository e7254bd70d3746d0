"""Tuning a space: tasks deduplicated across modules, one resumable budget, foreign databases refused."""
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eta.errors import EtaError
from eta.latency import compile_cache as cc
from eta.latency import schedules, tuning, tvm_backend

SHAPE = (1, 4, 8, 8)
# small searches: a test measures that budgets are kept, not that schedules are good
FAST = dict(num_trials_per_iter=2, population=16, progress=False)


def shared_conv():
    return nn.Conv2d(4, 4, 3, padding=1)


def module_a():
    torch.manual_seed(0)
    return nn.Sequential(shared_conv(), nn.ReLU(), nn.Conv2d(4, 8, 1)).eval()


def module_b():
    torch.manual_seed(1)  # other weights, same structure: the same task
    return nn.Sequential(shared_conv(), nn.ReLU()).eval()


def module_c():
    torch.manual_seed(2)
    return nn.Sequential(shared_conv(), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, stride=2)).eval()


@pytest.fixture(scope="module")
def target():
    return tvm_backend.host_target(num_cores=1)


def test_tasks_are_deduplicated_across_modules_and_weighted(target):
    tasks, found = tuning.space_tasks([(module_a(), SHAPE), (module_b(), SHAPE), (module_b(), (1, 4, 16, 16))], target)
    assert found == 4 and len(tasks) == 3  # conv3x3+relu at 8x8 twice, conv1x1, conv3x3+relu at 16x16
    assert sorted(t.weight for t in tasks) == [1, 1, 2]


def test_tasks_a_compile_pass_found_are_not_extracted_again_unless_one_is_untuned(tmp_path, target, monkeypatch):
    """A workload whose tasks are all tuned is not imported to look for tasks; one with an untuned task is, and a task
    that must be tuned after all gets the module full extraction gives it."""
    import tvm_ffi

    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    space = [(module_a(), SHAPE), (module_b(), SHAPE)]
    full, found = tuning.space_tasks(space, target)
    known = [cc.module_tasks(m, shape, target, key) for key, (m, shape) in zip("ab", space)]
    assert [sorted(t.hash for t in k) for k in known] == [sorted(cc.module_workloads(m, s, target, key)) for key, (m, s) in zip("ab", space)]
    imports = []
    real = tuning.to_relax
    monkeypatch.setattr(tuning, "to_relax", lambda *a: imports.append(a) or real(*a))
    every = {t.hash for t in full}
    fast, fast_found = tuning.space_tasks(space, target, known, tuned=every)
    assert not imports and fast_found == found
    assert {(t.hash, t.name, t.weight) for t in fast} == {(t.hash, t.name, t.weight) for t in full}
    assert all(t.mod is None for t in fast)
    [one_by_one] = [t for t in full if t.weight == 1 and t.hash not in {k.hash for k in known[1]}]  # module a's 1x1 conv
    partly, _ = tuning.space_tasks(space, target, known, tuned=every - {one_by_one.hash})
    assert len(imports) == 1 and imports[0][0] is space[0][0]  # only the workload with the untuned task
    tuning.materialize(partly, space, target)
    by_hash = {t.hash: t for t in full}
    assert all(tvm_ffi.structural_equal(t.mod, by_hash[t.hash].mod) for t in partly)


def test_foreign_database_is_refused(tmp_path, target):
    db = tmp_path / "db"
    schedules.open_database(db, target)
    state = json.loads((db / schedules.STATE).read_text())
    assert state["target"] == schedules.canonical_target(target) and state["tvm_version"] == schedules.tvm_version()
    schedules.open_database(db, target)  # the same target and TVM: accepted
    with pytest.raises(EtaError, match="tuned for .* not"):
        schedules.open_database(db, {**target, "mcpu": "x86-64-v3"})
    (db / schedules.STATE).write_text(json.dumps({**state, "tvm_version": "0.1.0"}))
    with pytest.raises(EtaError, match="TVM 0.1.0"):
        tuning.tune_space([(module_b(), SHAPE)], target, db, total_trials=2, **FAST)
    # records without provenance are adopted only when they name this target
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / schedules.RECORDS).write_text(json.dumps([0, [[], [1e-3], {"kind": "llvm", "mcpu": "znver1"}, []]]) + "\n")
    with pytest.raises(EtaError, match="another target"):
        schedules.open_database(bare, target)


def test_a_target_tvm_cannot_build_for_is_one_line(tmp_path, target):
    for bad, match in (({"kind": "nosuch"}, "does not accept"), ({"kind": "llvm", "mcpu": "notacpu"}, "knows no CPU")):
        with pytest.raises(EtaError, match=match) as err:
            tuning.tune_space([(module_b(), SHAPE)], bad, tmp_path / "db", total_trials=2, **FAST)
        assert "\n" not in str(err.value)
    with pytest.raises(EtaError, match="budget"):
        tuning.tune_space([(module_b(), SHAPE)], target, tmp_path / "db")


@pytest.mark.slow  # real MetaSchedule trials: about a minute on 2 cores
def test_interrupted_run_resumes_with_the_budget_left(tmp_path, target, caplog):
    db = tmp_path / "db"
    space = [(module_a(), SHAPE), (module_b(), SHAPE)]
    # interrupted after its first measured batch (a time limit stops it the way Ctrl-C would)
    with caplog.at_level(logging.WARNING, logger="eta.latency.tuning"):
        first = tuning.tune_space(space, target, db, total_trials=6, max_seconds=0, **FAST)
    assert (first.tasks_found, first.distinct, first.already_tuned) == (3, 2, 0)
    assert first.stopped == "time" and first.trials_run == first.trials_spent == 2
    assert "1 of 2 tasks have no tuned schedule yet" in caplog.text  # the user is told which part runs untuned
    # the batch was joined (saved, counted) before another task was searched: one batch went to the builder in all
    log = next((db / "logs").glob("*task_scheduler.log")).read_text()
    assert log.count("to builder") == 1
    # resumed: only the budget left is spent, and the counts add up
    second = tuning.tune_space(space, target, db, total_trials=6, **FAST)
    assert second.run == first.run and second.trials_run == 4 and second.trials_spent == 6
    per_task = {t["hash"]: t["trials"] for t in second.tasks}
    assert sum(per_task.values()) == 6 and all(n >= 2 for n in per_task.values()), per_task
    state = json.loads((db / schedules.STATE).read_text())
    assert state["runs"][second.run]["trials_spent"] == 6
    assert {h: t["trials"] for h, t in state["tasks"].items()} == per_task
    # spent: calling again costs nothing; a larger budget adds to what was spent
    assert tuning.tune_space(space, target, db, total_trials=6, **FAST).trials_run == 0
    more = tuning.tune_space(space, target, db, total_trials=8, **FAST)
    assert more.trials_run == 2 and more.trials_spent == 8


@pytest.mark.slow  # real MetaSchedule trials: under a minute on 2 cores
def test_the_tasks_said_to_be_tuned_further_are_those_the_resumed_run_tunes(tmp_path, target):
    """What a compile pass before tuning leaves for after it must be what tuning then changes: a task at its cap is
    not tuned again (its modules are built at once), one below it is (its modules wait)."""
    db = tmp_path / "db"
    space = [(module_a(), SHAPE), (module_b(), SHAPE)]
    first = tuning.tune_space(space, target, db, trials_per_task=1, max_seconds=0, run="r", **FAST)
    before = {t["hash"]: t["trials"] for t in first.tasks}
    further = tuning.tasks_to_tune_further(db, "r", trials_per_task=1)
    assert first.stopped == "time" and 0 < len(further) < len(before), before  # interrupted with one task at its cap
    second = tuning.tune_space(space, target, db, trials_per_task=1, run="r", **FAST)
    assert further == {t["hash"] for t in second.tasks if t["trials"] > before[t["hash"]]}
    assert tuning.tasks_to_tune_further(db, "r", trials_per_task=1) == frozenset()  # done
    assert tuning.tasks_to_tune_further(db, "r", trials_per_task=2) == set(before)  # a larger cap: every task again
    assert tuning.tasks_to_tune_further(db, "another run", trials_per_task=2) == frozenset()


def pooled(depth: int):
    """Convolutions then a global average pool: the pool's TIR block is named after its Relax variable, so it
    differs between networks of different depth while its structure (and workload hash) is the same."""
    torch.manual_seed(depth)
    layers = [m for _ in range(depth) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1)).eval()


@pytest.mark.slow  # real MetaSchedule trials: about a minute on 2 cores
def test_deepening_gives_tasks_tuned_before_trials_up_to_the_new_cap(tmp_path, target, monkeypatch):
    """Tasks with schedules already are left alone unless the run deepens: then each gets what it lacks of the cap,
    tuned on the module the database stores (another network's copy names its blocks otherwise, and its traces
    would leave a database that no longer loads)."""
    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "db"
    first = tuning.tune_space([(pooled(1), SHAPE)], target, db, trials_per_task=2, **FAST)
    assert first.trials_run == 2 * first.distinct
    deeper_net = [(pooled(2), SHAPE)]  # the same conv and pool tasks, the pool under another block name
    assert tuning.tune_space(deeper_net, target, db, trials_per_task=4, run="more", **FAST).trials_run == 0
    deeper = tuning.tune_space(deeper_net, target, db, trials_per_task=4, run="more", deepen=True, **FAST)
    assert deeper.already_tuned == deeper.distinct == first.distinct
    assert deeper.trials_run == deeper.trials_budget == 2 * deeper.distinct
    assert all(t["trials"] == 4 for t in deeper.tasks)
    assert tuning.tune_space(deeper_net, target, db, trials_per_task=4, run="more", deepen=True, **FAST).trials_run == 0
    tvm_backend.opened_database(db)  # every record replays on its stored workload
    assert cc.compiled_module(pooled(2), SHAPE, target, key="pooled2", database_dir=db).tuned_functions >= first.distinct
    with pytest.raises(EtaError, match="trials per task"):
        tuning.tune_space(deeper_net, target, db, total_trials=8, deepen=True, **FAST)


@pytest.mark.slow  # real MetaSchedule trials: about a minute on 2 cores
def test_a_task_tuned_for_one_space_is_not_tuned_again_for_another(tmp_path, target, monkeypatch):
    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "db"
    first = tuning.tune_space([(module_b(), SHAPE)], target, db, trials_per_task=2, **FAST)
    assert (first.distinct, first.tuned, first.trials_run) == (1, 1, 2)
    [shared] = [t["hash"] for t in first.tasks]
    other = tuning.tune_space([(module_c(), SHAPE)], target, db, trials_per_task=2, **FAST)
    assert (other.distinct, other.already_tuned, other.tuned, other.trials_run) == (2, 1, 1, 2)
    assert {t["hash"]: t["trials"] for t in other.tasks}[shared] == 2
    # compiled with the database: tuned schedules applied, another cache entry than untuned, same outputs
    module = module_c()
    tuned = cc.compiled_module(module, SHAPE, target, key="c", database_dir=db)
    untuned = cc.compiled_module(module, SHAPE, target, key="c")
    assert tuned.tuned_functions == 2 and untuned.tuned_functions == 0 and tuned.path != untuned.path
    assert tuned.schedules is not None and untuned.schedules is None
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    np.testing.assert_allclose(tuned.run(x), untuned.run(x), rtol=1e-4, atol=1e-5)
    assert cc.compiled_module(module, SHAPE, target, key="c", database_dir=db).cache_hit


def test_a_target_without_schedules_in_the_cache_starts_from_the_shipped_ones(tmp_path, monkeypatch):
    """Tuned schedules shipped with eta (predictors/schedules/<target>/) seed the cache's database once; a database
    already in the cache is never overwritten by them."""
    from eta import paths
    from eta.latency.schedules import target_slug
    from eta.latency.table import schedules_database

    target = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}
    shipped = tmp_path / "reference" / "schedules" / target_slug(target)
    shipped.mkdir(parents=True)
    (shipped / "database_workload.json").write_text('["w"]\n')
    (shipped / "database_tuning_record.json").write_text('[0, "r"]\n')
    monkeypatch.delenv("ETA_PREDICTORS_DIR", raising=False)
    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "reference_dir", lambda: tmp_path / "reference")
    db = schedules_database(target)
    assert db == tmp_path / "cache" / "schedules" / target_slug(target)
    assert (db / "database_tuning_record.json").read_text() == '[0, "r"]\n'
    (db / "database_tuning_record.json").write_text('[0, "r"]\n[0, "mine"]\n')  # tuned further here
    assert schedules_database(target) == db and "mine" in (db / "database_tuning_record.json").read_text()
    other = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
    assert not list(schedules_database(other).glob("*.json"))  # nothing shipped for it: an empty database


def test_a_packed_database_applies_the_same_schedules_with_only_the_best_records(tmp_path):
    """What ships (``pack``) keeps each workload's best record and the workloads they name; unpacked, the database's
    best records (what TVM applies, what the compile cache's digest names) are those of the original."""
    from eta.latency.schedules import FAILED_S, RECORDS, STATE, WORKLOADS, best_records, pack, unpack

    src = tmp_path / "db"
    src.mkdir()
    (src / WORKLOADS).write_text("".join(json.dumps([h, {"ir": h * 50}]) + "\n" for h in ("111", "222", "333")))
    recs = [[0, [{"t": "a"}, [0.003, 0.003]]], [0, [{"t": "b"}, [0.001, 0.002]]], [1, [{"t": "c"}, [FAILED_S]]],
            [2, [{"t": "d"}, [0.5]]], [2, [{"t": "e"}, [0.4, 0.6]]]]
    (src / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (src / STATE).write_text(json.dumps({"format": "eta-schedules/1", "tvm_version": "x", "target": {"kind": "llvm"},
                                         "tasks": {"111": {"trials": 2}}, "runs": {"space 1": {"trials_spent": 2}}}))
    assert pack(src, tmp_path / "packed") == {"workloads": 2, "records": 2}  # 222 has only a failed record
    assert not (tmp_path / "packed" / WORKLOADS).exists() and (tmp_path / "packed" / (WORKLOADS + ".gz")).is_file()
    unpack(tmp_path / "packed", tmp_path / "out")
    assert best_records(tmp_path / "out") == best_records(src) and set(best_records(src)) == {"111", "333"}
    state = json.loads((tmp_path / "out" / STATE).read_text())
    assert state["tvm_version"] == "x" and state["tasks"] == {"111": {"trials": 2}} and state["runs"] == {}


@pytest.mark.slow  # real MetaSchedule trials: about 20 s on 2 cores
def test_a_task_with_no_schedules_left_to_try_is_not_tuned_again(tmp_path, target):
    """A reshape has one schedule: once MetaSchedule has measured it, later calls do not pay for another search."""
    db = tmp_path / "db"
    flatten = [(nn.Flatten().eval(), (1, 8, 1, 1))]
    first = tuning.tune_space(flatten, target, db, trials_per_task=8, **FAST)
    assert first.distinct == 1 and 1 <= first.trials_run < 8  # fewer candidates than the cap allowed
    state = json.loads((db / schedules.STATE).read_text())
    assert [t.get("exhausted") for t in state["tasks"].values()] == [True]
    again = tuning.tune_space(flatten, target, db, trials_per_task=8, **FAST)
    assert again.trials_run == 0 and again.stopped == "done"


TWO_NODES = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    from eta.latency import compile_cache as cc, schedules, tuning, tvm_backend
    from tests.test_tuning import FAST, SHAPE, module_a, module_c

    db = sys.argv[1] + "/db"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"tune:cpu": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        target = tvm_backend.host_target(num_cores=1)
        space = [(module_a(), SHAPE), (module_c(), SHAPE)]
        first = tuning.tune_space(space, target, db, trials_per_task=2, nodes=("tune:cpu", 2), **FAST)
        again = tuning.tune_space(space, target, db, trials_per_task=2, nodes=("tune:cpu", 2), **FAST)
        tuned = [cc.compiled_module(m, SHAPE, target, key=k, database_dir=db).tuned_functions for k, (m, _) in zip("ac", space)]
        state = json.loads(open(db + "/" + schedules.STATE).read())
        json.dump({"first": first.to_dict(), "again": again.to_dict(), "driver": ray.get_runtime_context().get_node_id(),
                   "tuned_functions": tuned, "best": sorted(schedules.best_records(db)),
                   "state_trials": {h: t["trials"] for h, t in state["tasks"].items()}}, open(sys.argv[1] + "/result.json", "w"))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


@pytest.mark.slow  # three Ray nodes and real trials: about a minute on 2 cores
def test_tuning_spread_over_two_nodes_merges_every_share_into_one_database(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "ETA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    first, again = res["first"], res["again"]
    hashes = sorted(t["hash"] for t in first["tasks"])
    assert len(hashes) == first["distinct"] >= 3
    assert len(set(first["nodes"])) == 2 and res["driver"] not in first["nodes"]  # two shares, on the two tuning nodes
    assert res["best"] == hashes  # every task of both shares has a valid record in the merged database
    assert first["trials_run"] == first["trials_spent"] == sum(res["state_trials"].values()) == 2 * len(hashes)
    assert again["trials_run"] == 0
    assert res["tuned_functions"][0] >= 2 and res["tuned_functions"][1] >= 2  # TVM applies the merged records


def _int8_conv_block():
    """A basic block (two 3x3 convs and a projection shortcut), it quantized to 8 bits, one batch of its input codes."""
    from eta.arch import OpSpec
    from eta.families import build_operator
    from eta.quant import quantize_operator

    g = torch.Generator().manual_seed(1)
    float_op = build_operator(OpSpec("basic", 3, 1), (4, 8, 8), (8, 4, 4)).eval()
    qop = quantize_operator(float_op, 8, [torch.randn(8, *SHAPE[1:], generator=g)])
    return float_op, qop, qop.quantize_input(torch.randn(*SHAPE, generator=g))


def test_integer_kernels_are_tuning_tasks_of_their_own(target):
    """A quantized operator's integer convolutions are MetaSchedule tasks (int8 in, int32 out), distinct from the
    float operator's: a tuned table has them to tune."""
    float_op, qop, q_in = _int8_conv_block()
    integer, _ = tuning.space_tasks([(qop, tuple(q_in.shape))], target)
    floating, _ = tuning.space_tasks([(float_op, SHAPE)], target)
    assert any("conv2d" in t.name for t in integer)
    assert any("int8" in t.mod.script() and "int32" in t.mod.script() for t in integer)
    assert not {t.hash for t in integer} & {t.hash for t in floating}


@pytest.mark.slow  # real MetaSchedule trials: about 40 s on 2 cores
def test_tuned_integer_kernels_are_applied_and_stay_bit_exact(tmp_path, target, monkeypatch):
    """Tuned into the database, an integer operator compiles with those schedules (through the compiled-module
    cache, as a table entry) and its output codes still equal the exact integer reference."""
    from eta.latency import backends
    from eta.latency.protocol import Protocol
    from eta.quant.integer import integer_reference

    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "db"
    _, qop, q_in = _int8_conv_block()
    shape = tuple(q_in.shape)
    summary = tuning.tune_space([(qop, shape)], target, db, trials_per_task=1, **FAST)
    assert summary.tuned == summary.distinct >= 2
    tuned = cc.compiled_module(qop, shape, target, key="basic|w8", database_dir=db)
    untuned = cc.compiled_module(qop, shape, target, key="basic|w8")
    assert tuned.tuned_functions >= 2 and untuned.tuned_functions == 0 and tuned.input_dtype == qop.input_dtype
    reference = integer_reference(qop, q_in).numpy()
    np.testing.assert_array_equal(tuned.run(q_in.numpy()), reference)
    np.testing.assert_array_equal(untuned.run(q_in.numpy()), reference)
    # a tuned table's 8-bit entry: timed on those schedules, not refused
    protocol = Protocol(warmup=1, repeat=3, retries=0, min_repeat_ms=2, max_slowdown=None)
    provenance = {"backend": "tvm", "target": target, "schedule": "tuned", "protocol": protocol.__dict__}
    entry = backends.measure_entry(provenance, qop, shape, 8, db, key="basic|w8")
    assert entry["executable"] and entry["kernel_dtype"] == "int8" and entry["schedules"] == tuned.schedules
    assert entry["cache_hit"] and entry["median_ms"] > 0
