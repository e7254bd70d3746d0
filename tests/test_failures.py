"""A search survives failures: dying Ray workers, a lost node, and a driver killed in any phase.

Workers are made to die with eta's test-only hook ``ETA_FAULT_INJECT=phase:count:marker_dir``
(``eta/faults.py``): the first ``count`` units of a phase SIGKILL their own process after doing their
work. Searches that need their own Ray cluster, or that are killed, run in subprocesses with
explicit CPUs (``DRIVER``: eta's own local session; ``CLUSTER_DRIVER``: three nodes on 127.0.0.2),
so they never meet the session's ``ray_local`` cluster; what they leave behind is ended by pid.

Ray 2.60 resolves ``_node_ip_address="127.0.0.1"`` (and a ``127.0.0.1:port`` address) to the host's
own address, so local sessions started with it (``ray_local``, ``eta.raycluster``) listen there; the
node-removal test binds its cluster to 127.0.0.2, which Ray leaves alone, to stay on loopback.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from eta.pipeline import Search
from eta.space import parse_space

from .conftest import REPO, tiny_space_dict

log = logging.getLogger(__name__)

# The search as a user runs it (eta.pipeline.Search, every phase), logging to stderr.
DRIVER = textwrap.dedent('''
    import logging, sys
    from pathlib import Path
    from eta.pipeline import Search
    from eta.space import load_space
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "gekko", "matplotlib", "PIL", "urllib3", "wandb", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    Search(load_space(sys.argv[1]), runs_dir=Path(sys.argv[2]), progress=False, num_cpus=2).run_all()
''')


def _env(**extra) -> dict:
    """The subprocess environment: offline W&B, no inherited Ray address, eta importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ETA_FAULT_INJECT")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", RAY_AIR_NEW_OUTPUT="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **extra)
    return env


def _write_space(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def _kill_tree(proc: subprocess.Popen, children) -> None:
    """SIGKILL the driver, then end (by pid) whatever it started that did not die with it."""
    import psutil

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_driver(space: Path, runs: Path, log_path: Path, *, env: dict | None = None, kill_when=None, timeout: float = 600) -> dict:
    """Run ``DRIVER``; with ``kill_when`` (a predicate polled every 50 ms) SIGKILL it once that holds.

    Returns {"killed": bool, "rc": exit status, "log": its stderr}.
    """
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(space), str(runs)], env=env or _env(),
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        t0, children = time.time(), []
        try:
            while proc.poll() is None:
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"driver ran past {timeout} s; log: {log_path}")
                if kill_when is not None and kill_when():
                    children = _descendants(proc.pid)
                    _kill_tree(proc, children)
                    return {"killed": True, "rc": proc.returncode, "log": log_path.read_text()}
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                _kill_tree(proc, _descendants(proc.pid))
    return {"killed": False, "rc": proc.returncode, "log": log_path.read_text()}


def _read(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _front(pareto: dict) -> list[tuple]:
    return [(p["arch"], p["resolution"], p["latency_ms"]) for p in pareto["front"]]


# --------------------------------------------------------------------------------------------
# fast: the hook itself, pretraining's independence from grouping, a worker killed while pretraining
# --------------------------------------------------------------------------------------------

def test_fault_hook_kills_exactly_count_times(tmp_path):
    """The hook claims one marker per death, so retries in new processes eventually run normally."""
    from eta import faults

    faults.install(None)
    faults.maybe_die("pretrain", "u")  # unset: nothing happens
    code = "import sys; from eta import faults; faults.install(sys.argv[1]); faults.maybe_die('solve', 'unit')"
    fault = f"pretrain:5:{tmp_path / 'other'},solve:2:{tmp_path / 'm'}"
    rcs = [subprocess.run([sys.executable, "-c", code, fault], env=_env(), timeout=60).returncode for _ in range(3)]
    assert rcs == [-signal.SIGKILL, -signal.SIGKILL, 0]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["solve-0", "solve-1"]
    assert not (tmp_path / "other").exists()
    faults.install(f"teacher:1:{tmp_path}")
    try:
        with pytest.raises(ValueError, match="unknown phase"):
            faults.maybe_die("solve", "u")
    finally:
        faults.install(None)


def test_pretrained_block_weights_do_not_depend_on_grouping():
    """A resumed or re-planned pretrain phase trains other groups; each block must come out the same anyway."""
    import torch

    from eta.bound import bind, splits_for
    from eta.phases.pretrain import pretrain_group

    d = tiny_space_dict()
    d["data"]["max_train"] = 400
    d["pretrain"].update(epochs=1)
    space = parse_space(d)
    splits = splits_for(space)
    bound = bind(space, splits)
    trainable = [b for b in range(bound.num_blocks) if bound.trainable_specs(b)]
    a, b = trainable[-2], trainable[-1]  # the cheapest: low resolution
    together = pretrain_group(bound, splits, [a, b], seed=0)
    alone = pretrain_group(bound, splits, [b], seed=0)
    sa, sb = together[b][0], alone[b][0]
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_killed_pretrain_worker_is_retried(tmp_path, ray_local, monkeypatch):
    """A worker SIGKILLed after training its block group (result lost) is retried; every block lands on disk."""
    d = tiny_space_dict()
    d["data"]["max_train"] = 400
    d["teacher"]["train"]["epochs"] = 1
    d["pretrain"].update(epochs=1, tasks=2)
    monkeypatch.setenv("ETA_FAULT_INJECT", f"pretrain:1:{tmp_path / 'faults'}")
    search = Search(parse_space(d), runs_dir=tmp_path / "runs", progress=False)
    metrics = search.phase("pretrain")
    deaths = list((tmp_path / "faults").iterdir())
    assert [p.name for p in deaths] == ["pretrain-0"], "the injected worker death did not happen"
    assert search.done("pretrain")
    assert sorted(metrics) == [str(b) for b in range(search.bound.num_blocks)]
    for b in range(search.bound.num_blocks):
        assert search.run.block_weights(b).is_file()
        assert (("loss_last" in metrics[str(b)]) == bool(search.bound.trainable_specs(b)))


# --------------------------------------------------------------------------------------------
# slow: a node removed while pretraining
# --------------------------------------------------------------------------------------------

CLUSTER_DRIVER = textwrap.dedent('''
    import json, logging, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from eta.pipeline import Search
    from eta.space import load_space

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    space, runs, out = load_space(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    # loopback, but not 127.0.0.1: ray.init(address=...) rewrites 127.0.0.1 to the host's address, where a
    # cluster bound to 127.0.0.1 does not listen; any other 127/8 address is left alone
    loop = {"node_ip_address": "127.0.0.2"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **loop})
    try:
        workers = [cluster.add_node(num_cpus=1, **loop) for _ in range(2)]
        cluster.wait_for_nodes()
        search = Search(space, runs_dir=runs, progress=False, address=cluster.address)
        search.phase("teacher")  # driver only: the watcher below times pretraining alone
        p1 = search.run.pretrain_dir
        seen = {}

        def remove_when_a_block_is_done():
            while True:
                try:
                    done = json.loads((p1 / "metrics.json").read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    done = {}
                if done:  # pretraining runs, so the driver is connected; its own raylet must stay
                    mine = ray._private.worker.global_worker.node._raylet_socket_name
                    victim, kept = sorted(workers, key=lambda n: n._raylet_socket_name == mine)
                    seen["before"] = {b: (p1 / f"block_{int(b):02d}.safetensors").stat().st_mtime_ns for b in done}
                    seen["removed"], seen["kept"] = victim.node_id, kept.node_id
                    cluster.remove_node(victim, allow_graceful=False)
                    seen["removed_at"] = time.time()
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=remove_when_a_block_is_done, daemon=True)
        watcher.start()
        search.phase("pretrain")
        watcher.join(timeout=60)
        metrics = json.loads((p1 / "metrics.json").read_text())
        seen["after"] = {b: (p1 / f"block_{int(b):02d}.safetensors").stat().st_mtime_ns for b in metrics}
        seen["nodes"] = {b: m.get("node") for b, m in metrics.items()}
        seen["finished"] = {b: m.get("finished_at") for b, m in metrics.items()}
        seen["done"] = search.done("pretrain")
        seen["num_blocks"] = search.bound.num_blocks
        out.write_text(json.dumps(seen))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


@pytest.mark.slow
def test_worker_node_removed_mid_pretrain(tmp_path):
    """Three nodes on loopback; one worker node is removed once a block is done: its tasks move to the other."""
    d = tiny_space_dict()
    d["teacher"]["train"]["epochs"] = 2
    d["pretrain"].update(epochs=2, tasks=6)  # one block per task, so blocks finish one by one
    space = _write_space(tmp_path / "space.yaml", d)
    out = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_DRIVER, str(space), str(tmp_path / "runs"), str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"), cwd=REPO)
    try:
        rc = proc.wait(timeout=540)
    finally:
        if proc.poll() is None:
            _kill_tree(proc, _descendants(proc.pid))
    assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]
    res = json.loads(out.read_text())
    assert res["done"] and sorted(res["after"], key=int) == [str(b) for b in range(res["num_blocks"])], res
    assert res["before"] and len(res["before"]) < res["num_blocks"], f"the node was removed too late to matter: {res}"
    assert all(res["after"][b] == t for b, t in res["before"].items()), "a block finished before the removal was trained again"
    # blocks whose task finished after the removal (the task's own clock, the same machine's) ran on the node that is
    # left; a result that was ready before the removal may still reach the driver after it, so write times do not count
    late = [b for b, t in res["finished"].items() if t > res["removed_at"]]
    assert late and all(res["nodes"][b] == res["kept"] for b in late), res


# --------------------------------------------------------------------------------------------
# slow: the driver killed in each phase resumes to the front of an uninterrupted run
# --------------------------------------------------------------------------------------------

def kill_space() -> dict:
    """The tiny space cut into small units, so each phase has finished and unfinished ones to kill between."""
    d = tiny_space_dict(budgets=[0.6, 0.7, 0.85])
    d["pretrain"].update(tasks=6)  # one block per task
    d["solve"].update(eval_tasks=6)  # 24 samples in chunks of 4
    d["finetune"].update(num_cpus=2)  # one trial at a time on 2 CPUs
    # every run here must read the reference's table as it is: a drift check under the load the
    # killed drivers leave behind once found the machine "43 % slower" and measured the table again
    d["latency"]["drift_tolerance"] = None
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted search (it also fills the session's latency table, which later runs reuse)."""
    tmp = tmp_path_factory.mktemp("reference")
    space = _write_space(tmp / "space.yaml", kill_space())
    t0 = time.time()
    res = run_driver(space, tmp / "runs", tmp / "driver.log")
    assert res["rc"] == 0, res["log"][-4000:]
    log.info("uninterrupted search: %.0f s", time.time() - t0)
    return _read(tmp / "runs" / "tiny" / "pareto.json")


@pytest.fixture(scope="module")
def killed_thrice(tmp_path_factory, reference):
    """The same search, its driver SIGKILLed while pretraining, solving (twice) and finetuning, resumed each time."""
    tmp = tmp_path_factory.mktemp("killed")
    space = _write_space(tmp / "space.yaml", kill_space())
    root = tmp / "runs" / "tiny"
    p1, p2, p3 = root / "pretrain", root / "solve", root / "finetune"
    nblocks = 6
    states = {}

    def finetuned_students():
        return sorted(p3.glob("s_*/metrics.json"))

    kill_points = {
        "pretrain": lambda: 0 < len(_read(p1 / "metrics.json", {})) < nblocks,
        "samples": lambda: 0 < len(_read(p2 / "samples.json", [])) < 24,
        "budgets": lambda: bool(_read(p2 / "solved.json", {}).get("budgets")) and not (p2 / "solutions.json").exists(),
        "finetune": lambda: len(finetuned_students()) == 1,
    }
    t0 = time.time()
    for i, (name, when) in enumerate(kill_points.items()):
        res = run_driver(space, tmp / "runs", tmp / f"driver{i}.log", kill_when=when)
        assert res["killed"], f"the search finished before reaching kill point {name!r}"
        states[name] = {
            "log": res["log"],
            "blocks": {b: (p1 / f"block_{int(b):02d}.safetensors").stat().st_mtime_ns for b in _read(p1 / "metrics.json", {})},
            "samples": len(_read(p2 / "samples.json", [])),
            "budgets": sorted(_read(p2 / "solved.json", {}).get("budgets", {})),
            "students": {str(m): m.stat().st_mtime_ns for m in finetuned_students()},
        }
    final = run_driver(space, tmp / "runs", tmp / "driver_final.log")
    assert final["rc"] == 0, final["log"][-4000:]
    log.info("killed four times and resumed: %.0f s", time.time() - t0)
    logs = [(tmp / f"driver{i}.log").read_text() for i in range(1, len(kill_points))] + [final["log"]]
    return {"states": states, "resume_logs": dict(zip(kill_points, logs)), "pareto": _read(root / "pareto.json"), "root": root}


@pytest.mark.slow
def test_resume_after_kill_in_pretrain_keeps_finished_blocks(killed_thrice):
    st, resumed = killed_thrice["states"]["pretrain"], killed_thrice["resume_logs"]["pretrain"]
    assert st["blocks"]
    m = re.search(r"pretrain: (\d+) blocks in \d+ Ray tasks .*; (\d+) already on disk", resumed)
    assert m and int(m.group(2)) == len(st["blocks"]) and int(m.group(1)) == 6 - len(st["blocks"]), resumed[-3000:]
    p1 = killed_thrice["root"] / "pretrain"
    for b, mtime in st["blocks"].items():
        assert (p1 / f"block_{int(b):02d}.safetensors").stat().st_mtime_ns == mtime, f"block {b} was trained again"


@pytest.mark.slow
def test_resume_after_kill_in_solve_keeps_samples_and_solved_budgets(killed_thrice):
    st, resumed = killed_thrice["states"]["samples"], killed_thrice["resume_logs"]["samples"]
    m = re.search(r"solve: (\d+) of 24 sampled students already evaluated, (\d+) to evaluate", resumed)
    assert m and int(m.group(1)) == st["samples"] and int(m.group(2)) == 24 - st["samples"], resumed[-3000:]
    st, resumed = killed_thrice["states"]["budgets"], killed_thrice["resume_logs"]["budgets"]
    assert st["budgets"] and "solve: 24 of 24 sampled students already evaluated, 0 to evaluate" in resumed
    kept = re.findall(r"solve: budget ([0-9.]+) ms already solved", resumed)
    assert sorted(kept) == sorted(f"{float(b):.4f}" for b in st["budgets"]), resumed[-3000:]


@pytest.mark.slow
def test_resume_after_kill_in_finetune_keeps_finished_trials(killed_thrice):
    st, resumed = killed_thrice["states"]["finetune"], killed_thrice["resume_logs"]["finetune"]
    assert len(st["students"]) == 1 and "finetune: 1 of 2 students already finetuned, 1 to finetune" in resumed, resumed[-3000:]
    for path, mtime in st["students"].items():
        assert Path(path).stat().st_mtime_ns == mtime, "a finished trial was finetuned again"


@pytest.mark.slow
def test_killed_search_reaches_the_uninterrupted_front(killed_thrice, reference):
    got, want = killed_thrice["pareto"], reference
    assert _front(got) == _front(want)
    for g, w in zip(got["front"], want["front"]):
        assert g["test_acc"] == pytest.approx(w["test_acc"], abs=0.02)


@pytest.mark.slow
def test_dying_workers_in_solve_and_finetune_are_retried(tmp_path, reference):
    """A proxy-evaluation worker and a finetune trial are killed once each; the search reaches the same front."""
    space = _write_space(tmp_path / "space.yaml", kill_space())
    faults = tmp_path / "faults"
    res = run_driver(space, tmp_path / "runs", tmp_path / "driver.log",
                     env=_env(ETA_FAULT_INJECT=f"solve:1:{faults},finetune:1:{faults}"))
    assert res["rc"] == 0, res["log"][-4000:]
    assert sorted(p.name for p in faults.iterdir()) == ["finetune-0", "solve-0"]
    got = _read(tmp_path / "runs" / "tiny" / "pareto.json")
    assert _front(got) == _front(reference)
