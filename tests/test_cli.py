"""The CLI through typer's runner: real files, real commands, exit codes and messages."""

import json

from typer.testing import CliRunner

from cafe_ray.cli import app

runner = CliRunner()


def test_validate_ok_and_error(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("data: {name: digits}\nround: {num_rounds: 2}\n")
    r = runner.invoke(app, ["validate", str(good)])
    assert r.exit_code == 0 and "ok" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("round: {num_rouds: 2}\n")
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2
    assert "round.num_rouds" in r.output and "unknown key" in r.output


def test_validate_unknown_algorithm(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: {name: fedsgd}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "unknown algorithm 'fedsgd'" in r.output


def test_models_lists_the_zoo():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    for name in ("cnn_small", "conv3", "resnet18_ee", "transformer4"):
        assert name in r.output


def test_algorithms_and_profiles():
    r = runner.invoke(app, ["algorithms"])
    assert r.exit_code == 0 and "cafedistill" in r.output and "fedper_ee" in r.output
    r = runner.invoke(app, ["profiles", "iot_mix"])
    assert r.exit_code == 0 and "single_board" in r.output


def test_partition_writes_heatmap(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits, num_clients: 5}\n")
    png = tmp_path / "heat.png"
    r = runner.invoke(app, ["partition", str(cfg), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_sequential_end_to_end(tmp_path):
    r = runner.invoke(app, ["simulate", "--no-progress", "--set", f"output_dir={tmp_path}",
                            "--set", "executor=sequential", "--set", "round.num_rounds=2",
                            "--set", "data.num_clients=4", "--set", "profiles.catalog=uniform"])
    assert r.exit_code == 0, r.output
    (run_dir,) = list(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["dataset"] == "digits"


def test_simulate_bad_override_is_an_error(tmp_path):
    r = runner.invoke(app, ["simulate", "--set", "round.num_rounds=zero"])
    assert r.exit_code == 2 and "round.num_rounds" in r.output


def test_resume_refuses_new_settings(tmp_path):
    r = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--set", "seed=3"])
    assert r.exit_code == 2 and "drop CONFIG and --set" in r.output
