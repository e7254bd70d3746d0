"""Compiled-module cache: compile once, re-load after, rebuild what no longer loads; export what runs."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from eta.errors import EtaError
from eta.latency import compile_cache as cc
from eta.latency import deploy, schedules, tvm_backend

SHAPE = (1, 4, 8, 8)


def tiny(cin=4, cout=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def target():
    return tvm_backend.host_target(num_cores=1)


@pytest.fixture
def compiles(monkeypatch):
    """Count calls of tvm.compile (the cost the cache exists to avoid)."""
    import tvm

    calls = []
    real = tvm.compile

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tvm, "compile", counting)
    return calls


def torch_out(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_miss_then_hit_loads_without_compiling(cache, target, compiles):
    module = tiny()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    first = cc.compiled_module(module, SHAPE, target, key="conv|1x4x8x8|w32")
    assert not first.cache_hit and len(compiles) == 1
    assert first.path.is_file() and first.path.parent.parent == cache / "compiled"
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["key"] == "conv|1x4x8x8|w32" and meta["input_shape"] == list(SHAPE) and meta["schedules"] is None
    assert meta["tvm_version"] == schedules.tvm_version() and meta["target"] == schedules.canonical_target(target)
    assert meta["compile_s"] > 0
    second = cc.compiled_module(module, SHAPE, target, key="conv|1x4x8x8|w32")
    assert second.cache_hit and len(compiles) == 1, "a hit must not compile"
    assert second.path == first.path and second.compile_s == pytest.approx(meta["compile_s"])
    np.testing.assert_allclose(second.run(x), first.run(x), rtol=0, atol=0)
    np.testing.assert_allclose(second.run(x), torch_out(module, x), rtol=1e-4, atol=1e-5)
    assert second.time(tvm_backend.Protocol(warmup=1, repeat=3, retries=0, min_repeat_ms=1.0, max_slowdown=None)).median_ms > 0


def test_damaged_entries_are_rebuilt(cache, target, compiles, caplog):
    module = tiny()
    x = np.ones(SHAPE, dtype="float32")
    # filled by compile_many in this process (no library is loaded here, so the file can be damaged under us)
    [res] = cc.compile_many([cc.CompileJob("k", module, SHAPE, target)], workers=1)
    assert not res.hit and res.path.is_file()
    data = res.path.read_bytes()
    res.path.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="eta.latency.compile_cache"):
        again = cc.compiled_module(module, SHAPE, target, key="k")
    assert not again.cache_hit and len(compiles) == 2
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(again.run(x), torch_out(module, x), rtol=1e-4, atol=1e-5)


def test_entry_that_does_not_load_is_rebuilt(cache, target, compiles, caplog):
    """Intact by its checksum but not a library TVM can load (another TVM build wrote it): rebuilt, one warning."""
    module = tiny()
    path = cc.entry_path("bad", SHAPE, target)
    path.write_bytes(b"\x7fELF not really a library")
    identity = cc._identity("bad", SHAPE, target, None)
    path.with_suffix(".json").write_text(json.dumps({"format": cc.FORMAT, **identity, "compile_s": 1.0, "tuned_functions": 0,
                                                      "so_bytes": path.stat().st_size, "so_sha256": cc._file_sha(path)}))
    with caplog.at_level(logging.WARNING, logger="eta.latency.compile_cache"):
        got = cc.compiled_module(module, SHAPE, target, key="bad")
    assert not got.cache_hit and len(compiles) == 1
    assert [r for r in caplog.records if "does not load" in r.getMessage()]
    x = np.ones(SHAPE, dtype="float32")
    np.testing.assert_allclose(got.run(x), torch_out(module, x), rtol=1e-4, atol=1e-5)


def test_keys_differ_by_shape_target_and_schedules(cache, target):
    base = cc.entry_path("k", SHAPE, target)
    assert cc.entry_path("k", SHAPE, dict(target)) == base
    assert cc.entry_path("k", (1, 4, 16, 16), target) != base
    assert cc.entry_path("k", SHAPE, {**target, "num-cores": 7}) != base
    assert cc.entry_path("k", SHAPE, {**target, "mcpu": "x86-64-v3"}) != base
    assert cc.entry_path("other", SHAPE, target) != base
    assert cc.entry_path("k", SHAPE, target, "digest-a") not in (base, cc.entry_path("k", SHAPE, target, "digest-b"))


def _record(index, secs, trace="t"):
    return json.dumps([index, [[trace], [secs], {"kind": "llvm"}, []]])


def test_schedule_digest_follows_the_best_record_only(tmp_path):
    """Tuning that adds records elsewhere, or worse ones here, keeps the digest; a better one here changes it."""
    db = tmp_path / "db"
    db.mkdir()
    (db / schedules.WORKLOADS).write_text('["111","x"]\n["222","y"]\n')
    (db / schedules.RECORDS).write_text(_record(0, 2e-3, "a1") + "\n")
    d0 = schedules.schedule_digest(db, ["111"])
    assert d0 != schedules.schedule_digest(db, ["222"])
    with open(db / schedules.RECORDS, "a") as f:
        f.write(_record(1, 1e-3, "b1") + "\n" + _record(0, 5e-3, "a-worse") + "\n" + _record(0, 1e10, "a-failed") + "\n")
    assert schedules.schedule_digest(db, ["111"]) == d0
    with open(db / schedules.RECORDS, "a") as f:
        f.write(_record(0, 1e-3, "a-better") + "\n" + '[0, [["torn"')  # a line being written is skipped
    assert schedules.schedule_digest(db, ["111"]) != d0


def test_compile_many_two_workers_fills_the_cache(cache, target, compiles):
    jobs = [cc.CompileJob(f"conv{c}", tiny(4, c), SHAPE, target) for c in (4, 8, 12)]
    jobs.append(cc.CompileJob("conv4", tiny(4, 4), SHAPE, target))  # the same workload twice: compiled once
    results = cc.compile_many(jobs, workers=2)
    assert [r.key for r in results] == ["conv4", "conv8", "conv12", "conv4"]
    assert all(r.error is None and not r.hit and r.path.is_file() and r.compile_s > 0 for r in results)
    assert results[0].path == results[3].path and len({r.path for r in results}) == 3
    assert not compiles, "the workers compile, not this process"
    assert all(r.hit for r in cc.compile_many(jobs, workers=2))
    timed = cc.compiled_module(jobs[1].module, SHAPE, target, key="conv8")
    assert timed.cache_hit and not compiles


def test_a_tuned_only_job_builds_nothing_until_every_task_has_a_schedule(cache, target, compiles, tmp_path, monkeypatch):
    """Compiling before tuning: a module with an untuned task says which tasks it has and is left for after tuning;
    once the database has every schedule it is built, and later lookups know its tasks without an import."""
    db = tmp_path / "db"
    db.mkdir()
    job = cc.CompileJob("conv", tiny(4, 8), SHAPE, target, str(db), tuned_only=True)
    [left] = cc.compile_many([job], workers=1)
    assert left.untuned and left.path is None and not compiles
    assert left.tasks and {t.hash for t in left.tasks} == set(cc.module_workloads(tiny(4, 8), SHAPE, target, "conv"))
    monkeypatch.setattr(schedules, "tuned_hashes", lambda _db: {t.hash for t in left.tasks})  # as if tuned since
    # a task a resumed tuning run will tune further waits like an untuned one: built now, it would be built again after
    retuned = dataclasses.replace(job, retuning=frozenset({left.tasks[0].hash}))
    [waits] = cc.compile_many([retuned], workers=1)
    assert waits.untuned and waits.path is None and not compiles
    [built] = cc.compile_many([job], workers=1)
    assert not built.untuned and built.path.is_file() and len(compiles) == 1 and built.tasks == left.tasks
    [again] = cc.compile_many([job], workers=1)
    assert again.hit and again.tasks == left.tasks and len(compiles) == 1
    [stale] = cc.compile_many([retuned], workers=1)  # in the cache, but on a schedule about to change
    assert stale.untuned and len(compiles) == 1


def test_modules_compiled_ahead_are_taken_by_the_next_compile_round(cache, target, compiles):
    """compile_ahead returns at once; the next round takes what it built (not compiled twice) and timing waits for it."""
    jobs = [cc.CompileJob(f"conv{c}", tiny(4, c), SHAPE, target) for c in (4, 8)]
    assert cc.compile_ahead(jobs, workers=2) == 2
    assert cc.compile_ahead(jobs, workers=2) == 0  # on their way already
    module = cc.compiled_module(jobs[0].module, SHAPE, target, key="conv4")  # waits for the compiles, then loads
    assert module.cache_hit and not compiles
    results = cc.compile_many(jobs, workers=2)
    assert all(r.error is None and not r.hit and r.path.is_file() for r in results)  # built by the round ahead
    assert all(r.hit for r in cc.compile_many(jobs, workers=2)) and not compiles


def test_a_module_compiled_ahead_is_compiled_as_it_was_handed_over(cache, target):
    """The table compiles while the teacher trains: later changes to a module must not reach its compile (with one
    worker the last jobs wait in the pool's queue, long after compile_ahead returned)."""
    jobs = [cc.CompileJob(f"conv{c}", tiny(4, c, seed=c), SHAPE, target) for c in (4, 8, 12, 16)]
    x = np.random.default_rng(2).standard_normal(SHAPE).astype("float32")
    expected = torch_out(jobs[-1].module, x)
    assert cc.compile_ahead(jobs, workers=1) == 4
    with torch.no_grad():  # training goes on meanwhile
        for p in jobs[-1].module.parameters():
            p.zero_()
    cc.wait_for_compiles()
    compiled = cc.compiled_module(jobs[-1].module, SHAPE, target, key="conv16")
    assert compiled.cache_hit
    np.testing.assert_allclose(compiled.run(x), expected, rtol=1e-4, atol=1e-5)


DRIVER_QUEUING_A_LONG_COMPILE = textwrap.dedent("""
    import sys, time
    from torch import nn
    from eta.latency import compile_cache as cc, tvm_backend
    target = tvm_backend.host_target(num_cores=1)
    deep = nn.Sequential(*[nn.Sequential(nn.Conv2d(8 + i, 9 + i, 3, padding=1), nn.ReLU()) for i in range(48)])
    jobs = [cc.CompileJob("small", nn.Conv2d(4, 8, 3), (1, 4, 8, 8), target),
            cc.CompileJob("deep", deep, (1, 8, 16, 16), target)]
    cc.compile_ahead(jobs, workers=1)
    print("queued", flush=True)
    time.sleep(600)
""")


def test_compile_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A driver killed outright (SIGKILL) cannot shut its pool down; its worker must not go on compiling what was
    queued on a machine others share. One worker, a small job then a deep network (48 distinct convolutions,
    longer to compile than the 5 s the test waits): the driver is killed once the small job is built, so the worker
    is in the deep one, and must be gone within 5 s, the deep module never built."""
    import psutil

    cache_dir = tmp_path / "cache"
    env = {**os.environ, "ETA_CACHE_DIR": str(cache_dir)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_QUEUING_A_LONG_COMPILE], env=env, stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert driver.stdout.readline().strip() == "queued"
        t0 = time.time()
        while len(list(cache_dir.rglob("*.so"))) < 1:  # the small job is built: the worker has taken the deep one
            assert time.time() - t0 < 120 and driver.poll() is None, "the small module was not compiled"
            time.sleep(0.1)
        workers = [p for p in psutil.Process(driver.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 1
        driver.kill()
        driver.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, "the compile worker outlived the process that started it"
        assert len(list(cache_dir.rglob("*.so"))) == 1  # the deep module was not finished
    finally:
        driver.kill()
        for p in workers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_compile_many_reports_a_module_tvm_cannot_import(cache, target):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    [bad, good] = cc.compile_many([cc.CompileJob("odd", Odd(), SHAPE, target), cc.CompileJob("ok", tiny(), SHAPE, target)],
                                  workers=1)
    assert bad.path is None and "TVM cannot import" in bad.error
    assert good.error is None and good.path.is_file()


def test_exported_library_matches_pytorch(cache, target, tmp_path):
    module = tiny(seed=3)
    out = tmp_path / "export" / "student.so"
    info = deploy.export_library(module, SHAPE, target, out)
    assert out.is_file() and deploy.sidecar_path(out).is_file()
    assert info["input_shape"] == list(SHAPE) and info["schedules"] is None
    lib = deploy.load_exported_library(out)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype("float32")
    np.testing.assert_allclose(lib(x), torch_out(module, x), rtol=1e-4, atol=1e-5)
    assert deploy.check_exported(module, out) < 1e-4
    # the same structure with other weights is another artefact, not a cache hit of this one
    other = tiny(seed=4)
    with pytest.raises(EtaError, match="differ"):
        deploy.check_exported(other, out)
    deploy.export_library(other, SHAPE, target, tmp_path / "other.so")
    assert deploy.check_exported(other, tmp_path / "other.so") < 1e-4
    with pytest.raises(EtaError, match="missing"):
        deploy.load_exported_library(tmp_path / "nothing.so")


def test_the_uncached_api_still_compiles_and_times(target):
    module = tiny()
    compiled = tvm_backend.compile_module(module, SHAPE, target)
    assert isinstance(compiled, tvm_backend.CompiledModule) and not compiled.cache_hit and compiled.path is None
    assert compiled.compile_s > 0 and compiled.tuned_functions == 0
    x = np.ones(SHAPE, dtype="float32")
    np.testing.assert_allclose(compiled.run(x), torch_out(module, x), rtol=1e-4, atol=1e-5)
    m = tvm_backend.measure(module, SHAPE, target, tvm_backend.Protocol(warmup=1, repeat=3, retries=0, min_repeat_ms=1.0, max_slowdown=None))
    assert m.median_ms > 0 and m.compile_s > 0
