"""benchmarks/vectorize_auto.py: off / on / auto runs, the steady rounds timed, auto's choice read back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vectorize_auto.py"


def test_every_mode_runs_and_auto_reports_a_decision(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("vectorize_auto", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    rows = mod.main(["--widths", "8", "--repeats", "1", "--clients", "6", "--rounds", "7", "--executor", "sequential"])
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"off", "on", "auto"}
    assert by_mode["off"]["notes"] == [] and by_mode["on"]["notes"] == ["on"]
    (note,) = by_mode["auto"]["notes"]  # one actor: decided in round 5 of 7
    assert note.startswith(("auto: on", "auto: off"))
    assert all(r["steady_min"] > 0 for r in rows) and by_mode["off"]["vs_off_median"] == 1.0
