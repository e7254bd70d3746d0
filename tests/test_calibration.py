"""Calibrating the latency table against whole networks: the fit, the boundary term, storage and reuse."""
import json

import numpy as np
import pytest
from torch import nn

from eta.latency import calibrate, schedules, tvm_backend
from eta.latency.protocol import Measurement, Protocol
from eta.latency.backends import schedule_policy
from eta.latency.calibrate import fit_rows
from eta.latency.table import LatencyTable, default_table_path


def rows_from(table_sum, operators, measured):
    return [{"arch": f"s{i}", "choices": [i], "table_sum_ms": float(p), "operators": int(k), "measured_ms": float(m), "spread": 0.01}
            for i, (p, k, m) in enumerate(zip(table_sum, operators, measured))]


def synthetic(n=40, c=0.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    ops = rng.integers(2, 8, n)
    table_sum = 0.5 + ops * rng.uniform(0.2, 0.8, n)
    measured = 0.9 * table_sum + c * ops + 0.1
    return table_sum, ops, measured * (1 + noise * rng.standard_normal(n))


def test_boundary_term_is_recovered_and_chosen_only_when_it_helps():
    per_block = [np.array([0.0, 0.3, 0.6])] * 8
    identity = [np.array([True, False, False])] * 8
    table_sum, ops, measured = synthetic(c=-0.05)
    fit = calibrate.fit_calibration(table_sum, measured, ops)
    assert (fit.a, fit.b, fit.c) == (pytest.approx(0.9), pytest.approx(0.1), pytest.approx(-0.05))
    out = fit_rows(rows_from(table_sum, ops, measured), 0.5, per_block, identity)
    assert out["kind"] == "line+boundary" and out["after"]["mape"] < 1e-9
    assert out["cross_validated_mape"]["line+boundary"] < out["cross_validated_mape"]["line"]

    table_sum, ops, measured = synthetic(c=0.0, noise=0.01)
    out = fit_rows(rows_from(table_sum, ops, measured), 0.5, per_block, identity)
    assert out["kind"] == "line" and out["c"] == 0.0  # no boundary effect: HAO's plain line


def test_integer_scale_is_recovered_and_chosen_only_when_it_helps():
    """Mixed precision: integer entries that cost more inside a network than float ones get their own
    scale (``line+precision``); where both precisions scale alike the plain line stays."""
    rng = np.random.default_rng(4)
    n = 40
    float_sum, int_sum = 0.5 + rng.uniform(0.5, 4, n), rng.uniform(0, 3, n)
    ops = rng.integers(2, 8, n)
    rows = lambda measured: [r | {"int_table_ms": float(i)} for r, i in zip(rows_from(float_sum + int_sum, ops, measured), int_sum)]  # noqa: E731
    per_block = [np.array([0.0, 0.3, 0.6])] * 8
    identity = [np.array([True, False, False])] * 8
    integer = [np.array([False, False, True])] * 8
    measured = 1.05 * float_sum + 1.25 * int_sum + 0.1
    fit = calibrate.fit_calibration(float_sum + int_sum, measured, int_sum=int_sum)
    assert (fit.a, fit.a_int, fit.b, fit.c) == (pytest.approx(1.05), pytest.approx(1.25), pytest.approx(0.1), 0.0)
    out = fit_rows(rows(measured), 0.5, per_block, identity, integer)
    assert out["kind"] == "line+precision" and out["a_int"] == pytest.approx(1.25) and out["after"]["mape"] < 1e-9
    assert out["cross_validated_mape"]["line+precision"] < 0.9 * out["cross_validated_mape"]["line"]

    same = (1.05 * (float_sum + int_sum) + 0.1) * (1 + 0.01 * rng.standard_normal(n))
    out = fit_rows(rows(same), 0.5, per_block, identity, integer)
    assert out["kind"] == "line" and out["a_int"] is None


def test_poor_agreement_falls_back_to_a_ratio():
    per_block, identity = [np.array([0.0, 1.0])], [np.array([True, False])]
    rng = np.random.default_rng(3)
    table_sum = rng.uniform(1, 5, 12)
    measured = rng.uniform(1, 5, 12)  # unrelated: a busy machine
    out = fit_rows(rows_from(table_sum, [1] * 12, measured), 1.0, per_block, identity)
    assert out["kind"] == "ratio" and out["b"] == 0.0


def test_cross_validated_mape_counts_only_held_out_students():
    table_sum = np.arange(1.0, 11.0)
    measured = 2.0 * table_sum + 1.0
    assert calibrate.cross_validated_mape(table_sum, measured) == pytest.approx(0.0, abs=1e-12)
    measured[3] *= 1.5  # one outlier: held out, it is mispredicted; in-sample its error is spread over all
    assert calibrate.cross_validated_mape(table_sum, measured) > calibrate.agreement(calibrate.fit_calibration(table_sum, measured)(table_sum), measured)["mape"]


def test_folded_boundary_term_gives_the_calibrated_latency():
    rng = np.random.default_rng(0)
    per_block = [rng.uniform(0.1, 1.0, 4) for _ in range(5)]
    identity = [np.array([True, False, False, False])] * 5
    cal = calibrate.Calibration(a=1.1, b=0.2, c=-0.03)
    base, eff = cal.additive(0.7, per_block, identity)
    for choice in ([0, 1, 2, 3, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]):
        raw = 0.7 + sum(per_block[i][j] for i, j in enumerate(choice))
        ops = sum(not identity[i][j] for i, j in enumerate(choice))
        assert base + sum(eff[i][j] for i, j in enumerate(choice)) == pytest.approx(float(cal(raw, ops)))


def test_folded_integer_scale_gives_the_calibrated_latency():
    """The solver's additive model (calibrated constant plus calibrated option latencies) equals the
    calibration with a separate integer scale and a boundary term, for any mix of float, integer and identity blocks."""
    rng = np.random.default_rng(1)
    per_block = [rng.uniform(0.1, 1.0, 5) for _ in range(6)]
    identity = [np.array([True, False, False, False, False])] * 6
    integer = [np.array([False, False, True, False, True])] * 6
    cal = calibrate.Calibration(a=1.05, b=0.3, c=-0.02, a_int=1.25)
    base, eff = cal.additive(0.4, per_block, identity, integer)
    for choice in ([0, 1, 2, 3, 4, 0], [2, 2, 4, 4, 2, 4], [1, 3, 1, 3, 1, 3]):
        raw = 0.4 + sum(per_block[i][j] for i, j in enumerate(choice))
        ops = sum(not identity[i][j] for i, j in enumerate(choice))
        ints = sum(per_block[i][j] for i, j in enumerate(choice) if integer[i][j])
        assert base + sum(eff[i][j] for i, j in enumerate(choice)) == pytest.approx(float(cal(raw, ops, ints)))


def test_schedule_policy_names_the_table_and_separates_its_entries(tmp_path, monkeypatch):
    target = {"kind": "llvm", "mcpu": "x"}
    assert schedule_policy("tvm", tuned=False) == "untuned" and schedule_policy("tvm") == "tuned"
    assert schedule_policy("torch", torch_compile=True) == "torch.compile" and schedule_policy("torch") == "eager"
    untuned = default_table_path(tmp_path, "tvm", target, "cpu")
    tuned = default_table_path(tmp_path, "tvm", target, "cpu", "tuned")
    assert untuned.name == "tvm-cpu.json" and tuned.name == "tvm-cpu-tuned.json"

    calls = []
    monkeypatch.setattr(tvm_backend, "measure", lambda m, s, t, p=None, database_dir=None, key=None: calls.append((database_dir, key))
                        or Measurement(1.0, 0.01, 3, [1.0] * 3))
    from .test_latency import fake_compiles

    fake_compiles(monkeypatch)
    path = tmp_path / "t.json"
    t = LatencyTable.open(path, backend="tvm", target=target, device="cpu", protocol=Protocol(), schedule="tuned")
    t.measure_many([("op", nn.Identity, (1, 2), 32)], progress=False)
    # timed with the target's shared schedule database, compiled under the entry's key
    assert calls[0] == (t.database_dir, t.key("op", (1, 2), 32)) and t.database_dir.name == "llvm-x"
    # the same file opened as untuned: another schedule policy, so nothing is reused
    t2 = LatencyTable.open(path, backend="tvm", target=target, device="cpu", protocol=Protocol(), schedule="untuned")
    assert t2.entries == {} and t2.database_dir is None


def test_calibration_is_stored_with_the_table_and_reused(tmp_path, monkeypatch):
    """A second calibration of the same space measures nothing new and reads the stored students."""
    from eta.bound import bind, splits_for
    from eta.phases import latency
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    times = iter(np.linspace(1.0, 3.0, 1000))
    calls = []

    def fake(module, shape, target, protocol=None, database_dir=None, key=None):
        calls.append(shape)
        return Measurement(float(next(times)), 0.01, 3, [1.0] * 3)

    monkeypatch.setattr(tvm_backend, "measure", fake)
    from .test_latency import fake_compiles

    fake_compiles(monkeypatch)
    space = parse_space(tiny_space_dict(), "test")
    bound = bind(space, splits_for(space))
    measurer = latency.measurer(space)
    table = measurer.open_table(root=tmp_path)
    workloads = latency.space_workloads(bound)
    table.measure_many(workloads, progress=False)
    base, per_block = latency.option_latency_matrix(bound, table)
    first = latency.calibrate(bound, table, base, per_block, n_students=6, seed=0, progress=False, workloads=workloads)
    n_calls = len(calls)
    stored = json.loads(table.path.read_text())["calibrations"][first["space_key"]]
    assert len(stored["choices"]) == len(first["students"]) == 7  # the teacher and 6 students
    again = latency.calibrate(bound, measurer.open_table(root=tmp_path), base, per_block, n_students=3, seed=99, progress=False,
                              workloads=workloads)
    assert len(calls) == n_calls  # nothing re-measured
    assert [r["arch"] for r in again["students"]] == [r["arch"] for r in first["students"]]
    assert again["a"] == first["a"] and again["b"] == first["b"]


def test_modules_built_before_tuning_count_in_the_summary_of_the_pass_that_times_them(tmp_path, monkeypatch):
    """The compile round before tuning builds what has every schedule; the table's summary still says how many
    modules were compiled and in how long, for the entries it timed, and only a module still missing is compiled then."""
    from eta.latency import compile_cache
    from eta.latency.compile_cache import CompileResult, ModuleTask

    rounds, built = [], set()

    def compile_many(jobs, **kw):  # "b" has a task without a schedule; what was built once is a cache hit after
        rounds.append([(j.key, j.tuned_only) for j in jobs])
        out = []
        for j in jobs:
            untuned = j.tuned_only and j.key.startswith("b")
            out.append(CompileResult(j.key, None, 2.0, j.key in built, tasks=[ModuleTask(j.key, "t", 1)], untuned=untuned))
            built.update(() if untuned else (j.key,))
        return out

    monkeypatch.setattr(compile_cache, "compile_many", compile_many)
    monkeypatch.setattr(tvm_backend, "measure", lambda m, s, t, p=None, database_dir=None, key=None: Measurement(1.0, 0.01, 3, [1.0] * 3))
    t = LatencyTable.open(tmp_path / "t.json", backend="tvm", target={"kind": "llvm", "mcpu": "x"}, device="cpu",
                          protocol=Protocol(), schedule="tuned")
    items = [("a", nn.Identity, (1, 2), 32), ("b", nn.Identity, (1, 2), 32)]
    known = t.tuning_tasks(items, progress=False)
    assert [k[0].hash for k in known] == [t.key("a", (1, 2)), t.key("b", (1, 2))]
    assert rounds == [[(t.key("a", (1, 2)), True), (t.key("b", (1, 2)), True)]]
    t.measure_many(items, progress=False)
    assert rounds[1] == [(t.key("a", (1, 2)), False), (t.key("b", (1, 2)), False)]  # "a" a hit there, "b" built
    assert t.summary["compiled"] == 2 and t.summary["compile_s"] == 4.0  # "a" before tuning, "b" before timing


def test_the_fronts_tuning_run_is_named_by_its_networks(tmp_path, monkeypatch):
    """Resuming the front's tuning finds the interrupted run by its networks: a name made from the tasks found would
    change when a compile pass finds them otherwise, and the resumed call would start a new run with nothing to tune."""
    from eta.bound import bind, splits_for
    from eta.phases import latency
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    monkeypatch.setattr(tvm_backend, "measure", lambda m, s, t, p=None, database_dir=None, key=None: Measurement(1.0, 0.01, 3, [1.0] * 3))
    from .test_latency import fake_compiles

    fake_compiles(monkeypatch)
    names = []
    monkeypatch.setattr(latency, "tune", lambda space, m, table, workloads, name=None, progress=True: names.append((name, len(workloads))))
    space = parse_space(tiny_space_dict(), "test")
    bound = bind(space, splits_for(space))
    measurer = latency.measurer(space)
    table = measurer.open_table(root=tmp_path)
    students = [bound.arch(c) for c in latency.calibration_archs(bound, 2, seed=0)[-2:]]
    for archs in (students, students, students[:1]):
        latency.networks_latency(bound, table, archs, m=measurer)
    assert names[0][0] and names[0][0].startswith("front ") and names[0][1] == 2 * len(space.resolutions)
    assert names[1][0] == names[0][0] != names[2][0]


def test_a_resumed_tuning_run_leaves_the_networks_it_will_tune_further_for_after_it(tmp_path, monkeypatch):
    """The compile pass before a resumed front tuning builds only networks none of whose tasks the run will tune
    again: those below the cap wait (built before, they would be built again after); those at the cap, or with their
    design space used up, do not."""
    from eta.bound import bind, splits_for
    from eta.latency import compile_cache
    from eta.phases import latency
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    class Tuned(Exception):
        pass

    retuning = []

    def compile_many(jobs, **kw):
        retuning.extend(j.retuning for j in jobs if j.tuned_only)
        return [compile_cache.CompileResult(j.key, None, 0.0, True) for j in jobs]

    def tune_space(pairs, target, database_dir, **kw):
        raise Tuned

    monkeypatch.setattr(compile_cache, "compile_many", compile_many)
    monkeypatch.setattr(latency, "tune_space", tune_space)
    d = tiny_space_dict()
    d["latency"].update(schedules="tuned", tune={"trials_per_task": 4})
    space = parse_space(d, "test")
    bound = bind(space, splits_for(space))
    measurer = latency.measurer(space)
    table = measurer.open_table(root=tmp_path)
    archs = [bound.arch(c) for c in latency.calibration_archs(bound, 2, seed=0)[-2:]]
    run = latency.front_run([w for ws in latency.front_workloads(bound, archs) for w in ws])
    table.database_dir.mkdir(parents=True, exist_ok=True)
    schedules.write_state(table.database_dir, {
        "tasks": {"at_cap": {"trials": 4}, "below": {"trials": 2}, "used_up": {"trials": 1, "exhausted": True}},
        "runs": {run: {"tasks": ["at_cap", "below", "used_up"], "trials_spent": 7}}})
    with pytest.raises(Tuned):
        latency.networks_latency(bound, table, archs, m=measurer)
    assert retuning and all(r == {"below"} for r in retuning)
    retuning.clear()
    with pytest.raises(Tuned):  # another front: a run of its own, nothing of it tuned before
        latency.networks_latency(bound, table, archs[:1], m=measurer)
    assert retuning and all(r == frozenset() for r in retuning)
