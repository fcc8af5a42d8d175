"""`cafe-ray interference`: the exits' gradient cosines read back from a real run."""

from __future__ import annotations

from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.config import build_config
from cafe_ray.sim.engine import run_simulation
from cafe_ray.studies.interference import read_cosines, summarise


def _run(tmp_path, measure: bool):
    cfg = build_config({"executor": "sequential", "output_dir": str(tmp_path), "name": f"m{int(measure)}",
                        "data": {"name": "digits", "num_clients": 4}, "model": {"name": "cnn_small", "width": 8},
                        "round": {"num_rounds": 3, "eval_every": 3},
                        "algorithm": {"name": "cafedistill",
                                      "cafedistill": {"measure_interference": measure}}})
    run_dir, summary = run_simulation(cfg, show_progress=False)
    return run_dir, summary


def test_measured_cosines_are_summarised_and_change_no_metric(tmp_path):
    on, s_on = _run(tmp_path, True)
    _, s_off = _run(tmp_path, False)
    assert s_on["acc_avg_exit"] == s_off["acc_avg_exit"]  # a diagnostic: training is unchanged
    cos = read_cosines(on)
    assert sorted(cos) == ["0-1", "0-2", "1-2"] and len(cos["0-1"]) == 12  # 4 clients x 3 rounds
    rows = summarise([on], phases=3)
    assert {r["phase"] for r in rows} == {1, 2, 3} and all(-1 <= r["mean"] <= 1 for r in rows)
    res = CliRunner().invoke(app, ["interference", str(on), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert "| 0-2 |" in res.output and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_the_diagnostic_is_one_error_line(tmp_path):
    off, _ = _run(tmp_path, False)
    res = CliRunner().invoke(app, ["interference", str(off)])
    assert res.exit_code == 2 and "measure_interference=true" in res.output
