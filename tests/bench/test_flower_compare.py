"""benchmarks/flower_compare.py: the cafe-ray side of the comparison runs the documented workload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flower_compare.py"


def _side(side: str, python: str, tmp_path: Path) -> dict:
    out = subprocess.run([python, str(SCRIPT), "--side", side, "--clients", "3", "--rounds", "2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow  # a fresh local Ray in a subprocess
def test_the_cafe_ray_side_trains_and_evaluates_every_client_every_round(tmp_path):
    res = _side("cafe-ray", sys.executable, tmp_path)
    assert res["engine"] == "cafe-ray" and len(res["round_s"]) == 2 and res["total_s"] > sum(res["round_s"])
    assert len(res["acc_exit"]) == 3 and all(0 <= a <= 1 for a in res["acc_exit"])


@pytest.mark.slow  # Flower's own Ray in a subprocess
def test_both_engines_compute_the_same_accuracies(tmp_path):
    flower = Path(os.environ.get("CAFE_RAY_FLOWER_PYTHON", SCRIPT.parents[1] / ".flower-venv" / "bin" / "python"))
    if not flower.exists():
        pytest.skip("no Flower environment (not a dev dependency): the script's docstring makes .flower-venv")
    a, b = _side("cafe-ray", sys.executable, tmp_path), _side("flower", str(flower), tmp_path)
    assert a["acc_exit"] == pytest.approx(b["acc_exit"], abs=0.02)
