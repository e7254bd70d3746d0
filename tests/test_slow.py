"""End-to-end searches as a user runs them, through the command line (slow: run with -m slow)."""
import json
import subprocess
import sys

import pytest
import yaml

from eta.data import FASHION_MNIST_ROOT

from .conftest import REPO

pytestmark = pytest.mark.slow


def eta(*args):
    quiet = ["--no-progress"] if args[0] in ("demo", "search", "teacher") else []
    r = subprocess.run([sys.executable, "-m", "eta.cli", *args, *quiet], capture_output=True, text=True, cwd=REPO, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_demo_gives_a_front(tmp_path):
    out = eta("demo", "--runs-dir", str(tmp_path), "--schedules", "untuned").stdout  # tuned: see test_tuned_search
    pareto = json.loads((tmp_path / "digits" / "pareto.json").read_text())
    assert len(pareto["front"]) >= 3, out
    assert (tmp_path / "digits" / "pareto.png").exists()
    assert "Pareto front of digits" in out
    best = max(p["test_acc"] for p in pareto["front"])
    assert best > 0.9
    r = eta("export", str(tmp_path / "digits"), "--max-latency-ms", str(pareto["front"][-1]["latency_ms"]), "-o", str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "student.pt2").exists() and "exported" in r.stdout


@pytest.mark.skipif(not FASHION_MNIST_ROOT.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_teacher_then_search(tmp_path):
    d = yaml.safe_load((REPO / "search_spaces" / "fashion_mnist.yaml").read_text())
    d["data"].update(max_train=6000, max_test=2000)
    d["teacher"]["train"]["epochs"] = 3
    d["pool"] = d["pool"][:1] + d["pool"][-2:]  # basic widths, identity, teacher: a few minutes on 2 cores
    d["resolutions"] = [20, 28]
    d["latency"].update(calibration_students=5, schedules="untuned", max_slowdown=None)
    d["solve"].update(samples=60, sample_levels=5)
    d["finetune"].update(epochs=1, max_students=3)
    space = tmp_path / "fmnist.yaml"
    space.write_text(yaml.safe_dump(d))
    runs = str(tmp_path / "runs")
    eta("teacher", "train", str(space), "--runs-dir", runs, "--out", str(tmp_path / "teacher.safetensors"))
    manifest = json.loads((tmp_path / "runs" / "fashion_mnist" / "manifest.json").read_text())
    assert manifest["phases"]["teacher"]["test_acc"]["28"] > 0.7
    trained_at = manifest["phases"]["teacher"]["finished"]
    eta("search", str(space), "--runs-dir", runs)
    run = tmp_path / "runs" / "fashion_mnist"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["phases"]["teacher"]["finished"] == trained_at, "the cached teacher must be reused"
    pareto = json.loads((run / "pareto.json").read_text())
    front = pareto["front"]
    assert front and all(p["test_acc"] > 0.3 for p in front)  # 10 classes: chance is 0.1
    teacher28 = next(t for t in pareto["teacher"]["points"] if t["resolution"] == 28)
    best = max(front, key=lambda p: p["test_acc"])
    assert best["test_acc"] > teacher28["test_acc"] - 0.1 and front[0]["latency_ms"] < teacher28["latency_ms"]
    assert (tmp_path / "teacher.safetensors").exists()


def test_tuned_search_measures_every_network_with_tuned_schedules(tmp_path):
    """A tuned table end to end (one trial per task, so it is quick): the space's tasks are tuned into the target's
    database first, every entry and every whole network of the front is compiled with it, and the table says so."""
    from .conftest import tiny_space_dict

    d = tiny_space_dict(budgets=[0.8], resolutions=[16])  # one resolution: every tuned task and compile once, not twice
    d["pool"][0]["expansion"] = [2]
    # a budget below the number of tasks: tuning, its summary and the tuned compile run; tasks left get TVM's fallback
    d["latency"].update(schedules="tuned", tune={"trials_per_task": 1, "total_trials": 8, "population": 8})
    d["finetune"]["max_students"] = 1
    space = tmp_path / "tuned.yaml"
    space.write_text(yaml.safe_dump(d))
    env_runs = str(tmp_path / "runs")
    eta("search", str(space), "--runs-dir", env_runs)
    run = tmp_path / "runs" / "tiny"
    info = json.loads((run / "latency" / "latency.json").read_text())
    assert info["schedule"] == "tuned" and info["target"]["mcpu"] in ("x86-64-v3", info["target"]["mcpu"])
    table = json.loads((run / "latency" / "table.json").read_text())
    assert table["provenance"]["schedule"] == "tuned"
    entries = [e for e in table["entries"].values() if e.get("executable", True)]
    assert entries and all(e["schedules"] for e in entries), "every entry ran tuned schedules"
    manifest = json.loads((run / "manifest.json").read_text())
    tuning = manifest["phases"]["latency"]["tuning"]
    assert tuning["trials_run"] > 0 and tuning["distinct"] > 0
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["front"] and all(p["latency_ms"] > 0 for p in pareto["all"])
