"""`cafe-ray serve` and `cafe-ray bench serve` are registered, documented and fail clearly."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.commands.serve import _bench_group

runner = CliRunner()


def test_serve_command_is_registered_with_its_options():
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0, r.output
    for opt in ("--host", "--port", "--replicas", "--max-batch", "--max-models", "--learned"):
        assert opt in r.output


def test_bench_serve_joins_the_existing_bench_group():
    r = runner.invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "serve" in r.output and "overhead" in r.output
    assert runner.invoke(app, ["bench", "serve", "--help"]).exit_code == 0
    assert len([g for g in app.registered_groups if g.name == "bench"]) == 1


def test_bench_group_is_created_when_missing():
    fresh = typer.Typer()
    assert _bench_group(fresh) is _bench_group(fresh)
    assert [g.name for g in fresh.registered_groups] == ["bench"]


def test_serve_rejects_a_directory_that_is_not_a_run(tmp_path):
    r = runner.invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "(no config.yaml)" in " ".join(r.output.split())


def test_serve_rejects_a_bad_port(tmp_path):
    r = runner.invoke(app, ["serve", str(tmp_path), "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output


def test_serve_rejects_a_bad_autoscale_range(tmp_path):
    for bad, text in (("3", "--autoscale: give MIN:MAX"), ("3:1", "--autoscale")):
        r = runner.invoke(app, ["serve", str(tmp_path), "--autoscale", bad])
        assert r.exit_code == 2 and text in " ".join(r.output.split()), r.output


def test_serve_lists_the_slo_and_scale_options():
    r = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    for opt in ("--latency-slo-ms", "--max-accuracy-drop", "--slo-curve", "--autoscale", "--target-ongoing"):
        assert opt in r.output


def test_an_unknown_slo_curve_is_one_error_line(tmp_path):
    r = runner.invoke(app, ["serve", str(tmp_path), "--slo-curve", "mine"])
    assert r.exit_code == 2 and "--slo-curve: Input should be 'pooled' or 'client'" in r.output, r.output
    r = runner.invoke(app, ["bench", "serve", str(tmp_path), "--ramp", "1", "--slo-curve", "mine"])
    assert r.exit_code == 2 and "--slo-curve: 'pooled' or 'client' (got 'mine')" in r.output, r.output


def test_a_failed_serve_leaves_the_callers_ray_and_serve_running(http, tmp_path):
    """In a process that already runs Ray and Serve (a notebook, this test session), a serve that
    fails to start must not end them: only a Ray the command started is its to stop."""
    assert http.get("/healthz").status_code == 200
    r = runner.invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2
    assert http.get("/healthz").status_code == 200
