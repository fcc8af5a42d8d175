"""benchmarks/slo_ladder_check.py on the tests' served run: both curves scored on held-out halves of val."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "slo_ladder_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("slo_ladder_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_curves_start_at_full_depth_and_cost_less_further_down(serve_run_dir):
    res = _module().check(serve_run_dir, drop=0.2, splits=3, rungs=5)
    assert set(res) == {"client", "pooled"}
    for arr in res.values():
        assert arr.shape == (3, 5, 3)
        assert abs(arr[:, 0, 2]).max() < 1e-12  # rung 0 is full depth, a point of the fixed-threshold curve
        assert (arr[:, 1:, 0] <= arr[:, :1, 0] + 1e-9).all()  # every rung below costs at most full depth
        assert (arr[:, :, 1] >= 0).all() and (arr[:, :, 1] <= 1).all()


def test_the_script_prints_one_row_per_curve(serve_run_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), str(serve_run_dir), "--drop", "20", "--splits", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\| (client|pooled) \| ([+-]\d+\.\d+)", out.stdout, re.M)
    assert [r[0] for r in rows] == ["client", "pooled"], out.stdout
