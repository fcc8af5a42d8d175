"""benchmarks/coordinator_stages.py: a real run on Ray, every stage timed in every steady round."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coordinator_stages.py"


@pytest.mark.slow  # a fresh local Ray in a subprocess
def test_stage_timers_cover_the_round_and_its_serial_work(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "5"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (\S.*?)\s{2,}([\d.]+) /", out.stdout, re.M)}
    for stage in ("round", "outside ray.wait", "ray.wait", "unpack", "aggregate", "state commits", "log writes"):
        assert stage in rows, (stage, out.stdout)
    assert "2 steady rounds" in out.stdout
    assert 0 < rows["outside ray.wait"] < rows["round"]
