"""Sharing a machine: one owner per run directory, one timing at a time, shared tables that merge."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from eta.errors import EtaError
from eta.locks import holder, run_lock, timing_lock

from .conftest import REPO, tiny_space_dict


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="offline", ETA_LOCK_DIR=str(tmp_path / "locks"), PYTHONPATH=str(REPO), **extra)
    return env


HOLD = textwrap.dedent('''
    import sys, time
    from eta.locks import run_lock
    with run_lock(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(120)
''')


def _hold_in_subprocess(root, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_process_refuses_a_run_in_use_and_takes_it_over_after_a_kill(tmp_path):
    root = tmp_path / "runs" / "r"
    root.mkdir(parents=True)
    proc = _hold_in_subprocess(root, tmp_path)
    try:
        with pytest.raises(EtaError, match=rf"run {root} is in use: held by pid {proc.pid} on .*wait for it"):
            with run_lock(root):
                pass
        assert holder(root / ".lock")["pid"] == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with run_lock(root):  # the kernel released the dead holder's lock
        assert holder(root / ".lock")["pid"] == os.getpid()


def test_the_cli_refuses_a_run_in_use_in_one_line(tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_space_dict()))
    root = tmp_path / "runs" / "tiny"
    root.mkdir(parents=True)
    proc = _hold_in_subprocess(root, tmp_path)
    try:
        r = subprocess.run([sys.executable, "-m", "eta.cli", "search", str(space), "--runs-dir", str(tmp_path / "runs")],
                           env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("eta: error:")]
    assert len(errors) == 1 and f"pid {proc.pid}" in errors[0] and "in use" in errors[0]
    assert sorted(p.name for p in root.iterdir()) == [".lock"]  # nothing was written into the run


def test_the_timing_lock_is_machine_wide_and_says_what_it_waits_for(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ETA_LOCK_DIR", str(tmp_path / "locks"))
    code = textwrap.dedent('''
        import sys, time
        from eta.locks import timing_lock
        with timing_lock("cpu", "a benchmark"):
            print("timing", flush=True)
            time.sleep(2)
    ''')
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "timing"
    t0 = time.time()
    with caplog.at_level("INFO", logger="eta.locks"):
        with timing_lock("cpu"):
            waited = time.time() - t0
    proc.wait()
    assert waited > 0.5, "the second timing started while the first was running"
    assert f"waiting for pid {proc.pid}" in caplog.text and "a benchmark" in caplog.text
    with timing_lock("cuda:0"):  # another device is another lock
        with timing_lock("cpu"):
            with timing_lock("cpu"):  # re-entrant within a process
                pass


WRITER = textwrap.dedent('''
    import sys
    from eta.latency.table import LatencyTable
    path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(n):
        t = LatencyTable.open(path, backend="tvm", target={"kind": "llvm"}, device="test")
        t.entries[f"{who}-{i}|1x1|w32"] = {"signature": f"{who}-{i}", "input_shape": [1, 1], "bits": 32, "median_ms": 1.0 + i}
        t.save()
''')


def test_concurrent_writers_of_a_shared_table_lose_no_entry(tmp_path):
    path = tmp_path / "table.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}", "25"], env=_env(tmp_path)) for k in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(f"w{k}-{i}|1x1|w32" for k in range(4) for i in range(25))


BUILD = textwrap.dedent('''
    import logging, sys
    from pathlib import Path
    from eta.pipeline import Search
    from eta.space import load_space
    logging.basicConfig(level=logging.INFO)
    with Search(load_space(sys.argv[1]), runs_dir=Path(sys.argv[2]), progress=False, num_cpus=1) as s:
        s.phase("latency")
''')


@pytest.mark.slow
def test_two_searches_on_one_machine_never_time_at_once_and_share_one_table(tmp_path, monkeypatch):
    """Two latency phases of different spaces run at once into one shared table: no two timings overlap
    (each entry records when it was timed), and the table ends with every entry of both."""
    spaces = []
    for i, pool in enumerate(([{"family": "ir", "kernel": [3], "expansion": [2, 4]}, {"family": "teacher"}],
                              [{"family": "fused", "kernel": [3], "expansion": [2]}, {"family": "identity"}, {"family": "teacher"}])):
        d = tiny_space_dict(pool=pool, budgets=[1.0])
        d["name"] = f"space{i}"
        d["latency"].update(drift_tolerance=None, calibration_students=2)
        spaces.append(tmp_path / f"s{i}.yaml")
        spaces[-1].write_text(yaml.safe_dump(d))
    env = _env(tmp_path, ETA_PREDICTORS_DIR=str(tmp_path / "tables"))
    monkeypatch.setenv("ETA_LOCK_DIR", env["ETA_LOCK_DIR"])
    logs = [tmp_path / f"log{i}" for i in range(2)]
    with timing_lock("cpu", "the test, until both searches wait"):  # so they surely meet at the lock
        procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(s), str(tmp_path / "runs")], env=env,
                                  stderr=open(log, "w")) for s, log in zip(spaces, logs)]
        deadline = time.monotonic() + 600
        while not all(f"waiting for pid {os.getpid()}" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.5)
    assert [p.wait(timeout=900) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    (table,) = (tmp_path / "tables").rglob("*.json")
    entries = json.loads(table.read_text())["entries"]
    for i in range(2):
        copy = json.loads((tmp_path / "runs" / f"space{i}" / "latency" / "table.json").read_text())["entries"]
        assert set(copy) <= set(entries)  # what each search measured is in the shared table
    intervals = sorted(tuple(e["timed_at"]) for e in entries.values() if e.get("timed_at"))
    assert len(intervals) >= 10
    overlaps = [(a, b) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]
    assert not overlaps, overlaps[:3]
