"""Benchmarks are commands users run on their own runs: a bad argument ends in one line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_BENCHMARKS = ["headline", "deployment"]  # the two the README names; every benchmark ends through common.run_command


@pytest.mark.parametrize("name", RUN_BENCHMARKS)
def test_a_benchmark_given_no_run_says_so_in_one_line(name, tmp_path):
    missing = tmp_path / "no-such-run"
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", str(missing)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error:") and str(missing) in lines[0]
    assert not missing.exists()
