"""The command line as a user meets it: --help everywhere, bad input is one line and exit code 2."""
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, tiny_space_dict

VERBS = [["search"], ["demo"], ["teacher", "train"], ["pretrain"], ["latency", "build"], ["latency", "validate"], ["solve"], ["finetune"], ["pareto"], ["export"]]


def eta(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "eta.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_every_verb_has_help(verb):
    r = eta(*verb, "--help")
    assert r.returncode == 0 and "usage: eta" in r.stdout


def _one_line_error(r):
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("eta: error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    line = _one_line_error(eta("search", str(p), "--runs-dir", str(tmp_path / "runs")))
    assert "malformed YAML" in line and "bad.yaml" in line
    assert not (tmp_path / "runs").exists()


def _search_error(tmp_path, edit) -> str:
    """Run `eta search` on the tiny space after ``edit(space_dict)``; return its one error line."""
    d = tiny_space_dict()
    edit(d)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    return _one_line_error(eta("search", str(p), "--runs-dir", str(tmp_path / "runs")))


def test_unknown_operator(tmp_path):
    line = _search_error(tmp_path, lambda d: d["pool"][0].update(family="wavelet"))
    assert "pool.0.family" in line and "wavelet" in line


def test_missing_data(tmp_path):
    line = _search_error(tmp_path, lambda d: d.update(data={"dataset": "fashion_mnist", "root": str(tmp_path / "nowhere"), "resolution": 28}))
    assert "nowhere" in line
    assert not (tmp_path / "runs").exists()


def test_teacher_that_cannot_be_split(tmp_path):
    line = _search_error(tmp_path, lambda d: d["teacher"].update(model="tests.unsplittable:make"))
    assert "blocks" in line and "Opaque" in line


def test_unknown_teacher(tmp_path):
    line = _search_error(tmp_path, lambda d: d["teacher"].update(model="no_such_model_xyz"))
    assert "no_such_model_xyz" in line


def test_pareto_of_missing_run(tmp_path):
    line = _one_line_error(eta("pareto", str(tmp_path)))
    assert "not an eta run" in line


def test_latency_validate_reports_and_stores_the_calibration(tmp_path):
    """eta latency validate on a space: whole students compiled, r and MAPE printed, the fit stored in the table."""
    import json
    import os

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_space_dict()))
    r = subprocess.run([sys.executable, "-m", "eta.cli", "latency", "validate", str(space), "--runs-dir", str(tmp_path / "runs"),
                        "--students", "5", "--no-progress", "--plot", str(tmp_path / "cal.png")],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "ETA_PREDICTORS_DIR": str(tmp_path / "pred")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Pearson r" in r.stdout and "MAPE" in r.stdout and (tmp_path / "cal.png").stat().st_size > 5000
    (table,) = (tmp_path / "pred").rglob("*.json")
    (cal,) = json.loads(table.read_text())["calibrations"].values()
    assert len(cal["choices"]) == 6  # the teacher and 5 students
    report = json.loads((tmp_path / "runs" / "tiny" / "latency" / "validation.json").read_text())
    import numpy as np

    pred = np.array([x["table_sum_ms"] for x in report["students"]])
    meas = np.array([x["measured_ms"] for x in report["students"]])
    assert report["before"]["pearson_r"] == pytest.approx(np.corrcoef(pred, meas)[0, 1])
    assert report["before"]["mape"] == pytest.approx(np.mean(np.abs(pred - meas) / meas))
