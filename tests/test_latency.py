"""Latency tables: TVM agrees with PyTorch, entries are cached, invalidated and resumed as promised."""
import json
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from eta.arch import OpSpec
from eta.errors import EtaError
from eta.latency import calibrate, table as table_mod, tvm_backend
from eta.latency.protocol import Measurement, Protocol, relative_spread
from eta.latency.table import LatencyTable, default_table_path
from eta.families import build_operator

FAST = Protocol(warmup=1, repeat=5, max_cv=0.05, retries=1, min_repeat_ms=2.0, max_slowdown=None)


def conv_block(cin=8, cout=16):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    bn = block[1]
    bn.running_mean.uniform_(-1, 1)  # non-trivial statistics so a dropped BN would be visible
    bn.running_var.uniform_(0.5, 2.0)
    return block.eval()


@pytest.fixture(scope="module")
def target():
    return tvm_backend.host_target(num_cores=1)


def open_table(path, target, backend="tvm", device="test-cpu"):
    return LatencyTable.open(path, backend=backend, target=target, device=device, protocol=FAST)


def fake_compiles(monkeypatch):
    """Nothing is compiled before timing when timing itself is faked."""
    from eta.latency import compile_cache

    monkeypatch.setattr(compile_cache, "compile_many", lambda jobs, **kw: [compile_cache.CompileResult(j.key, None, 0.0, True) for j in jobs])


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace TVM timing with a counter; each call returns a distinct latency."""
    calls = []

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        calls.append(tuple(input_shape))
        return Measurement(median_ms=float(len(calls)), spread=0.01, repeats=3, samples_ms=[1.0, 1.0, 1.0])

    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    return calls


def items(n, bits=32):
    return [(f"op{i}", nn.Identity, (1, 4, i + 1, i + 1), bits) for i in range(n)]


def test_tvm_matches_torch_for_conv_block(target):
    block = conv_block()
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype("float32")
    compiled = tvm_backend.compile_module(block, x.shape, target)
    with torch.no_grad():
        ref = block(torch.from_numpy(x)).numpy()
    out = compiled.run(x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    m = compiled.time(FAST)
    assert m.median_ms > 0 and m.repeats == FAST.repeat and len(m.samples_ms) == FAST.repeat
    assert m.spread == pytest.approx(relative_spread(m.samples_ms))
    assert m.compile_s > 0


def test_constants_folded_in_numpy_leave_the_workloads_and_outputs_of_relax_folding(target):
    """Batch norm's arithmetic on weights, folded before Relax's FoldConstant: same TIR tasks, same numbers."""
    import tvm
    from tvm import relax

    block = conv_block()  # batch norm with statistics that are not the identity
    mod = tvm_backend.to_relax(block, (1, 8, 12, 12))
    tvm_target = tvm.target.Target(target)
    seq = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                    relax.get_pipeline("zero")])
    by_relax, by_numpy = seq(mod), tvm_backend.lower_for_tuning(mod)
    assert "sqrt" not in tvm_backend.fold_constants(relax.transform.DecomposeOpsForInference()(mod)).script(show_meta=False)

    def hashes(lowered):
        return sorted(tvm_backend.workload_hash(t) for t in tvm_backend.extract_tasks(lowered, tvm_target))

    assert hashes(by_numpy) == hashes(by_relax) and hashes(by_numpy)
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype("float32")
    outs = []
    for lowered in (by_relax, by_numpy):
        _, device, vm = tvm_backend.load_vm(lowered, target)
        outs.append(vm["main"](tvm.runtime.tensor(x, device))[0].numpy())
    with torch.no_grad():
        ref = block(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[1], ref, rtol=1e-4, atol=1e-4)


def test_protocol_sizes_repeats_and_keeps_tightest_attempt():
    from eta.latency.protocol import measure_callable

    attempts = iter([[1.0, 2.0, 3.0, 4.0], [1.0, 1.5, 1.0, 1.2], [1.0, 3.0, 1.0, 3.0]])
    numbers = []

    def timer(number, repeat):
        numbers.append(number)
        if repeat != 4:  # sizing: 0.01 ms per run, but the very first batch was descheduled (5 ms)
            return [5.0 if len(numbers) == 1 else 0.01] + [0.01] * (repeat - 1)
        return next(attempts)

    m = measure_callable(timer, lambda: None, Protocol(warmup=0, repeat=4, max_cv=0.01, retries=2, min_repeat_ms=10.0, max_slowdown=None))
    assert m.number == 1000  # 1000 runs x 0.01 ms = one 10 ms repeat
    assert m.samples_ms == [1.0, 1.5, 1.0, 1.2]  # the tightest of the three attempts
    assert m.median_ms == pytest.approx(1.1)


def test_cache_hit_does_not_remeasure(tmp_path, target, fake_measure):
    path = tmp_path / "t.json"
    t = open_table(path, target)
    first = t.measure_many(items(3), progress=False)
    assert len(fake_measure) == 3
    again = open_table(path, target).measure_many(items(3), progress=False)
    assert len(fake_measure) == 3
    assert again == first
    assert open_table(path, target).get("op1", (1, 4, 2, 2)) == 2.0


def test_a_machine_that_disagrees_with_the_cached_entries_measures_the_table_again(tmp_path, target, monkeypatch):
    """Same target name, another machine: within the tolerance the entries stay; beyond it they all go to stale."""
    speed = {"factor": 1.0}
    calls = []

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        calls.append(tuple(input_shape))
        ms = speed["factor"] * input_shape[-1]
        return Measurement(median_ms=ms, spread=0.01, repeats=3, samples_ms=[ms] * 3)

    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    path = tmp_path / "t.json"
    open_table(path, target).measure_many(items(6), progress=False)
    speed["factor"] = 1.05  # run-to-run noise: keep
    t = open_table(path, target)
    assert t.check_drift(items(6)) == pytest.approx(1.05)
    assert len(t.entries) == 6 and len(calls) == 6 + 3
    speed["factor"] = 1.5  # a burst of load during the first round only: confirmed rounds find the table right
    t = open_table(path, target)
    real_measure = measure

    def bursty(module, input_shape, target, protocol=None, database_dir=None, key=None):
        m = real_measure(module, input_shape, target, protocol, database_dir)
        if len(calls) == 6 + 3 + 3:  # the whole first round (3 entries) was slowed
            speed["factor"] = 1.0
        return m

    monkeypatch.setattr(tvm_backend, "measure", bursty)
    fake_compiles(monkeypatch)
    assert t.check_drift(items(6), pause_s=0) == pytest.approx(1.0)
    assert len(t.entries) == 6
    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    speed["factor"] = 1.3  # another instance of the same CPU
    t = open_table(path, target)
    assert t.check_drift(items(6), pause_s=0) == pytest.approx(1.3)
    assert t.entries == {} and len(t.stale[-1]["entries"]) == 6
    out = t.measure_many(items(6), progress=False)
    assert sorted(out.values()) == pytest.approx([1.3 * (i + 1) for i in range(6)])
    assert open_table(path, target).get("op5", (1, 4, 6, 6)) == pytest.approx(7.8)  # the file holds the new entries


def test_measuring_again_keeps_the_faster_of_two_measurements(tmp_path, target, monkeypatch):
    """A measurement slowed by interference is replaced by a faster one; a fast one is not replaced by a slow one."""
    speed = {"factor": 2.0}

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        ms = speed["factor"] * input_shape[-1]
        return Measurement(median_ms=ms, spread=0.01, repeats=3, samples_ms=[ms] * 3)

    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    t = open_table(tmp_path / "t.json", target)
    t.measure_many(items(2), progress=False)
    speed["factor"] = 1.0
    t.measure_again(items(1))  # op0: 2.0 -> 1.0
    speed["factor"] = 3.0
    t.measure_again(items(2)[1:])  # op1: 4.0 stays
    again = open_table(tmp_path / "t.json", target)
    assert again.get("op0", (1, 4, 1, 1)) == 1.0 and again.entry("op0", (1, 4, 1, 1))["slower_measurement_ms"] == 2.0
    assert again.get("op1", (1, 4, 2, 2)) == 4.0 and again.entry("op1", (1, 4, 2, 2))["slower_measurement_ms"] == 6.0


def test_timing_side_by_side_times_every_item_in_each_sweep_and_leaves_the_table_as_it_was(tmp_path, target, monkeypatch):
    """time_now: rounds sweep over all items in turn, each keeps its fastest sweep; no entry changes."""
    order, speed = [], {"factor": 2.0}

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        order.append(input_shape[-1])
        ms = speed["factor"] * input_shape[-1]
        speed["factor"] = max(0.5, speed["factor"] - 0.5)  # the machine speeds up during the sweeps
        return Measurement(median_ms=ms, spread=0.01, repeats=3, samples_ms=[ms] * 3)

    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    t = open_table(tmp_path / "t.json", target)
    t.passes = 1
    t.measure_many(items(2), progress=False)
    before, order[:] = open_table(tmp_path / "t.json", target).entries, []
    assert t.time_now(items(2), rounds=2) == [0.5 * 1, 0.5 * 2]
    assert order == [1, 2, 1, 2]  # whole sweeps, not one item's repeats back to back
    assert open_table(tmp_path / "t.json", target).entries == before and t.entries == before
    # one network reached twice (a baseline that is one of eta's students): timed once a sweep, one figure for both
    order[:] = []
    twice = items(2) + items(2)[:1]
    assert t.time_now(twice, rounds=2) == [0.5 * 1, 0.5 * 2, 0.5 * 1] and order == [1, 2, 1, 2]


def test_a_two_pass_table_times_every_entry_twice_in_separate_passes(tmp_path, target, monkeypatch):
    """passes=2 (what searches use): first every entry, then every entry again; a burst in one pass is not kept."""
    order = []

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        order.append(input_shape[-1])
        burst = 3.0 if len(order) == 2 else 1.0  # the second measurement of the run is slowed by load
        ms = burst * input_shape[-1]
        return Measurement(median_ms=ms, spread=0.01, repeats=3, samples_ms=[ms] * 3)

    monkeypatch.setattr(tvm_backend, "measure", measure)
    fake_compiles(monkeypatch)
    t = LatencyTable.open(tmp_path / "t.json", backend="tvm", target=target, device="test-cpu", protocol=FAST, passes=2)
    out = t.measure_many(items(3), progress=False)
    assert order == [1, 2, 3, 1, 2, 3]
    assert sorted(out.values()) == [1.0, 2.0, 3.0] and t.entry("op1", (1, 4, 2, 2))["slower_measurement_ms"] == 6.0
    t.measure_many(items(3), progress=False)
    assert len(order) == 6  # both timings are recorded: nothing is measured a third time


@pytest.mark.parametrize("change", ["target", "tvm_version", "device"])
def test_changed_provenance_remeasures_and_keeps_old_entries_visible(tmp_path, target, fake_measure, monkeypatch, change):
    path = tmp_path / "t.json"
    open_table(path, target).measure_many(items(2), progress=False)
    assert len(fake_measure) == 2
    device = "test-cpu"
    if change == "target":
        target = {**target, "mcpu": "some-other-cpu"}
    elif change == "device":
        device = "another-cpu"
    else:
        versions = table_mod._versions()
        monkeypatch.setattr(table_mod, "_versions", lambda: {**versions, "tvm_version": "9.9.9"})
    t = open_table(path, target, device=device)
    assert t.get("op0", (1, 4, 1, 1)) is None
    t.measure_many(items(2), progress=False)
    assert len(fake_measure) == 4
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 2 and data["entries"][t.key("op0", (1, 4, 1, 1))]["median_ms"] == 3.0
    assert len(data["stale"]) == 1 and len(data["stale"][0]["entries"]) == 2  # invalidated, not silently dropped


def test_torch_version_does_not_invalidate_a_tvm_table(tmp_path, target, fake_measure, monkeypatch):
    path = tmp_path / "t.json"
    open_table(path, target).measure_many(items(2), progress=False)
    versions = table_mod._versions()
    monkeypatch.setattr(table_mod, "_versions", lambda: {**versions, "torch_version": "0.0.1"})
    open_table(path, target).measure_many(items(2), progress=False)
    assert len(fake_measure) == 2


def test_interrupted_build_resumes(tmp_path, target, fake_measure, monkeypatch):
    path = tmp_path / "t.json"
    todo = items(5)
    timing = tvm_backend.measure

    def interrupted_at_the_third(module, input_shape, *a, **kw):
        if len(fake_measure) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third entry is timed
        return timing(module, input_shape, *a, **kw)

    monkeypatch.setattr(tvm_backend, "measure", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        open_table(path, target).measure_many(todo, progress=False)
    on_disk = json.loads(path.read_text())["entries"]
    assert set(on_disk) == {LatencyTable.key(s, sh, b) for s, _, sh, b in todo[:2]}
    monkeypatch.setattr(tvm_backend, "measure", timing)
    out = open_table(path, target).measure_many(todo, progress=False)
    assert fake_measure == [sh for _, _, sh, _ in todo]  # items 0, 1 once; then 2, 3, 4
    assert all(v is not None for v in out.values()) and len(out) == 5


def test_an_entry_whose_schedules_were_tuned_further_is_measured_again(tmp_path, target, monkeypatch):
    """A tuned table re-measures a cached entry once the database holds other schedules for its workloads."""
    from eta.latency import compile_cache

    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    digest = {"now": "d1"}
    timed = []

    def measure(module, input_shape, target, protocol=None, database_dir=None, key=None):
        assert database_dir is not None  # a tuned table compiles with its database
        timed.append(tuple(input_shape))
        return Measurement(median_ms=float(len(timed)), spread=0.01, repeats=3, samples_ms=[1.0] * 3, schedules=digest["now"])

    monkeypatch.setattr(tvm_backend, "measure", measure)
    monkeypatch.setattr(compile_cache, "schedule_digest_of", lambda module, shape, target, key, db, relax_mod=None: digest["now"])
    fake_compiles(monkeypatch)
    todo = items(3)
    table = LatencyTable.open(tmp_path / "t.json", backend="tvm", target=target, device="test-cpu", protocol=FAST, schedule="tuned")
    assert table.database_dir is not None
    first = table.measure_many(todo, progress=False)
    assert len(timed) == 3
    assert table.measure_many(todo, progress=False) == first and len(timed) == 3  # same schedules: nothing timed again
    digest["now"] = "d2"  # tuning went on: every workload has new schedules
    again = table.measure_many(todo, progress=False)
    assert len(timed) == 6 and all(again[k] != first[k] for k in first)
    assert all(e["schedules"] == "d2" for e in table.entries.values())
    # no record added since the entries were timed: their digest is not even computed
    records = table.database_dir / "database_tuning_record.json"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_text("")
    past = time.time() - 3600
    os.utime(records, (past, past))
    digest["now"] = "d3"
    assert table.measure_many(todo, progress=False) == again and len(timed) == 6
    os.utime(records, None)  # records written now: the digests are compared, and differ
    table.measure_many(todo, progress=False)
    assert len(timed) == 9


def test_bit_width_without_integer_kernels_is_reported_not_replaced(tmp_path, target, fake_measure):
    """An operator with no integer lowering at 8 bits is recorded as not executable, with the reason; never timed in float."""
    path = tmp_path / "t.json"
    t = open_table(path, target)
    silu = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU())  # noqa: E731
    out = t.measure_many([("op0", silu, (1, 4, 6, 6), 8), ("op0", silu, (1, 4, 6, 6), 32)], progress=False)
    assert len(fake_measure) == 1  # only the float entry was timed
    assert t.get("op0", (1, 4, 6, 6), 8) is None and t.get("op0", (1, 4, 6, 6), 32) == 1.0
    assert out[t.key("op0", (1, 4, 6, 6), 8)] is None
    entry = json.loads(path.read_text())["entries"][t.key("op0", (1, 4, 6, 6), 8)]
    assert entry["executable"] is False and entry["reason"].startswith("8-bit")
    torch_table = LatencyTable.open(tmp_path / "torch.json", backend="torch", target={"kind": "cpu"}, device="cpu", protocol=FAST)
    torch_table.measure_many([("ir", lambda: build_operator(OpSpec("ir", 3, 2.0), (8, 8, 8), (8, 8, 8)), (1, 8, 8, 8), 8)], progress=False)
    assert "integer kernels are TVM's" in torch_table.entry("ir", (1, 8, 8, 8), 8)["reason"]


def test_integer_entries_are_measured_with_integer_kernels(tmp_path, target):
    """8- and 4-bit entries of a conv operator are timed as TVM integer modules; 4 bits run on 8-bit kernels."""
    from eta.quant import quantize_operator

    def op(bits):
        float_op = build_operator(OpSpec("ir", 3, 2.0), (8, 8, 8), (8, 8, 8)).eval()
        return float_op if bits == 32 else quantize_operator(float_op, bits, [torch.randn(2, 8, 8, 8)])

    t = open_table(tmp_path / "t.json", target)
    t.measure_many([("ir", (lambda b=b: op(b)), (1, 8, 8, 8), b) for b in (32, 8, 4)], progress=False)
    for bits, kernel in ((8, "int8"), (4, "int8")):
        e = t.entry("ir", (1, 8, 8, 8), bits)
        assert e["executable"] and e["median_ms"] > 0 and e["kernel_dtype"] == kernel
    assert t.get("ir", (1, 8, 8, 8), 32) > 0


def test_fresh_measurement_agrees_with_cached_entry(tmp_path, target):
    """A recompiled, re-timed operator lands within a tolerance set by the spread its entry recorded.

    Both sides are the faster of two separate timings, as the pipeline's tables are (``passes=2``): one
    burst of load on a shared CI machine made a single cached timing 60 % slower than the fresh one.
    """
    op = build_operator(OpSpec("ir", 3, 4.0), (16, 16, 16), (16, 16, 16)).eval()
    shape = (1, 16, 16, 16)
    protocol = Protocol(repeat=5, min_repeat_ms=5.0, max_slowdown=None)
    t = LatencyTable.open(tmp_path / "t.json", backend="tvm", target=target, device="test-cpu",
                          protocol=protocol, passes=2)
    t.measure_many([("ir_k3_e4", lambda: op, shape, 32)], progress=False)
    entry = t.entry("ir_k3_e4", shape)
    assert entry["executable"] and entry["compile_s"] > 0 and entry["number"] >= 1
    assert entry["number"] * entry["median_ms"] >= 2.5  # one repeat lasted about min_repeat_ms
    assert entry["slower_measurement_ms"] >= entry["median_ms"]
    fresh = min((tvm_backend.measure(op, shape, target, protocol) for _ in range(2)), key=lambda m: m.median_ms)
    tolerance = max(3 * entry["spread"], 0.5)  # this VM's speed drifts (docs/results.md: 1.6x between two sweeps minutes apart)
    assert abs(fresh.median_ms - entry["median_ms"]) / entry["median_ms"] <= tolerance


def test_torch_backend_times_eager_module():
    from eta.latency import torch_backend

    m = torch_backend.measure(conv_block(), (1, 8, 12, 12), protocol=FAST)
    assert m.median_ms > 0 and len(m.samples_ms) == FAST.repeat and m.number >= 1
    assert torch_backend.device_name("cpu")


def test_default_table_path_names_target_and_device(tmp_path):
    p = default_table_path(tmp_path, "tvm", {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}, "AMD EPYC 7B13")
    assert p == tmp_path / "llvm-znver3" / "tvm-amd-epyc-7b13.json"


def test_calibration_and_agreement_on_synthetic_data():
    table_sum = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    measured = 0.8 * table_sum + 0.25
    cal = calibrate.fit_calibration(table_sum, measured)
    assert cal.a == pytest.approx(0.8) and cal.b == pytest.approx(0.25)
    np.testing.assert_allclose(cal(table_sum), measured)

    predicted = np.array([1.0, 2.0, 3.0, 4.0])
    actual = np.array([1.0, 2.0, 3.0, 5.0])  # only the last one is off, by -20%
    out = calibrate.agreement(predicted, actual)
    assert out["pearson_r"] == pytest.approx(np.corrcoef(predicted, actual)[0, 1])
    assert out["mape"] == pytest.approx(0.2 / 4)
    assert out["worst"][0] == {"index": 3, "predicted": 4.0, "measured": 5.0, "rel_error": pytest.approx(-0.2)}


def test_empty_schedule_database_still_compiles_correctly(tmp_path, target):
    """The tuned-schedule path lowers the module the way MetaSchedule keys it; no records means untuned, not broken."""
    block = conv_block()
    x = np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype("float32")
    compiled = tvm_backend.compile_module(block, x.shape, target, database_dir=tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(compiled.run(x), block(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-4)
    assert compiled.tuned_functions == 0


def test_tune_refuses_the_ffi_release_that_crashes_metaschedule(tmp_path, target, monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: "0.1.15.post2" if pkg == "apache-tvm-ffi" else real_version(pkg))
    with pytest.raises(EtaError, match="apache-tvm-ffi==0.1.14.post1"):
        tvm_backend.tune(conv_block(), (1, 8, 10, 10), target, tmp_path / "db", trials=2)
    assert not (tmp_path / "db").exists()  # refused before anything ran


def test_tuning_crash_is_one_line_error(tmp_path, target, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    def crash(*args, **kwargs):
        raise RuntimeError("InternalError: Check failed: (f != nullptr)\nStack trace:\n  0: ...")

    monkeypatch.setattr(ms.relax_integration, "extract_tasks", crash)
    with pytest.raises(EtaError) as err:
        tvm_backend.tune(conv_block(), (1, 8, 10, 10), target, tmp_path / "db", trials=2)
    assert str(err.value) == "MetaSchedule tuning of Sequential failed: InternalError: Check failed: (f != nullptr)"


@pytest.mark.slow
def test_tuned_schedules_are_applied_and_not_tuned_twice(tmp_path, target, monkeypatch):
    """A few MetaSchedule trials land in the database, compile_module applies them correctly, a re-tune skips."""
    from tvm.s_tir import meta_schedule as ms

    block, work = conv_block(), tmp_path / "db"
    x = np.random.default_rng(2).standard_normal((1, 8, 10, 10)).astype("float32")
    tvm_backend.tune(block, x.shape, target, work, trials=4, max_workers=1)
    records = (work / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1
    compiled = tvm_backend.compile_module(block, x.shape, target, database_dir=work)
    assert compiled.tuned_functions >= 1  # a tuned schedule replaced TVM's default one
    with torch.no_grad():
        np.testing.assert_allclose(compiled.run(x), block(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-4)

    def must_not_tune(**kwargs):
        raise AssertionError("every workload already had a record")

    monkeypatch.setattr(ms.tune, "tune_tasks", must_not_tune)
    tvm_backend.tune(block, x.shape, target, work, trials=4)
    assert (work / "database_tuning_record.json").read_text().splitlines() == records


def test_protocol_resizes_repeats_that_were_sized_during_a_slow_spell():
    from eta.latency.protocol import measure_callable

    calls = []

    def timer(number, repeat):
        calls.append((number, repeat))
        if len(calls) == 1:  # sizing while the machine was busy: 10 ms per run
            return [10.0] * repeat
        if number == 1:  # single short runs are noisy
            return [0.1, 0.3, 0.1, 0.3][:repeat]
        return [0.1] * repeat  # enough runs per repeat: stable

    m = measure_callable(timer, lambda: None, Protocol(warmup=0, repeat=4, max_cv=0.05, retries=2, min_repeat_ms=10.0, max_slowdown=None))
    assert m.number == 100 and m.samples_ms == [0.1] * 4 and m.spread == 0.0


def test_torch_compile_failure_is_one_line_error(monkeypatch):
    from eta.latency import torch_backend

    def broken_compile(model):
        def run(x):
            raise RuntimeError("InductorError: no working C++ compiler\ndetails follow")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(EtaError, match="^torch.compile failed for Sequential: InductorError: no working C\\+\\+ compiler"):
        torch_backend.measure(conv_block(), (1, 8, 12, 12), protocol=FAST, compile=True)
