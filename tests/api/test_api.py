"""cafe_ray.simulate and cafe_ray.Run on real Ray, against the CLI on the same config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import cafe_ray
from cafe_ray.cli import app
from cafe_ray.config import ConfigError
from cafe_ray.models import EarlyExitNet
from cafe_ray.runs import rundir

QUICKSTART = Path(__file__).resolve().parents[2] / "simulations" / "quickstart.yaml"


def test_simulate_returns_the_run_the_cli_makes_for_the_same_config(tmp_path):
    # both in-process (executor: sequential, which gives the Ray executor's results: tests/sim);
    # the callback's path on Ray is tested with the plug-ins' Ray run
    rounds: list[dict] = []
    run = cafe_ray.simulate(str(QUICKSTART), overrides={"round.num_rounds": 3, "executor": "sequential",
                                                        "output_dir": str(tmp_path / "api")},
                            show_progress=False, on_round=rounds.append)
    assert isinstance(run, cafe_ray.Run) and run.path.parent == tmp_path / "api"
    assert isinstance(run.metrics, pd.DataFrame) and len(run.metrics) == 3
    assert list(run.metrics["round"]) == [0, 1, 2]
    # the callback saw each round's record once, in order
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["acc_avg_exit"] == run.metrics["acc_avg_exit"].iloc[-1] == run.summary["acc_avg_exit"]
    r = CliRunner().invoke(app, ["simulate", str(QUICKSTART), "--no-progress", "--set", "round.num_rounds=3",
                                 "--set", "executor=sequential", "--set", f"output_dir={tmp_path / 'cli'}"])
    assert r.exit_code == 0, r.output
    (cli_dir,) = (tmp_path / "cli").iterdir()
    cli_summary = json.loads((cli_dir / rundir.SUMMARY).read_text())
    assert run.summary["acc_avg_exit"] == cli_summary["acc_avg_exit"]
    assert run.summary["acc_exit"] == cli_summary["acc_exit"]

    again = cafe_ray.Run.load(run.path)
    assert isinstance(again.clients, pd.DataFrame) and len(again.clients) > 0
    assert set(again.clients["client"]) <= set(range(10))
    assert again.config.round.num_rounds == 3 and again.config.algorithm.name == "cafedistill"
    model = again.model(0)
    assert isinstance(model, EarlyExitNet) and not model.training
    x = torch.zeros(2, 1, 8, 8)
    assert len(model(x)) == model.num_exits == len(again.summary["exit_macs"])


def test_resume_continues_a_run_to_its_last_round(tmp_path):
    cfg = {"name": "r", "executor": "sequential", "output_dir": str(tmp_path),
           "data": {"name": "digits", "num_clients": 4}, "model": {"name": "cnn_small", "width": 8},
           "round": {"num_rounds": 2, "eval_every": 1}, "train": {"max_steps": 2},
           "checkpoint": {"every": 1}}
    seen: list[int] = []
    run = cafe_ray.simulate(cfg, show_progress=False, on_round=lambda r: seen.append(r["round"]))
    assert len(run.metrics) == 2 and run.finished and seen == [0, 1]
    # a longer run of the same directory: make the saved config ask for 3 rounds, then resume
    saved = rundir.CONFIG
    text = (run.path / saved).read_text().replace("num_rounds: 2", "num_rounds: 3")
    (run.path / saved).write_text(text)
    (run.path / rundir.SUMMARY).unlink()
    resumed = cafe_ray.Run.load(run.path).resume(show_progress=False, on_round=lambda r: seen.append(r["round"]))
    assert resumed.finished and list(resumed.metrics["round"]) == [0, 1, 2] and seen == [0, 1, 2]


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, parsed from the TFRecord event files themselves."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_event_files_hold_every_round(tmp_path):
    cfg = {"name": "tb", "executor": "sequential", "output_dir": str(tmp_path), "logging": {"tensorboard": True},
           "data": {"name": "digits", "num_clients": 4}, "model": {"name": "cnn_small", "width": 8},
           "round": {"num_rounds": 3, "eval_every": 2}, "train": {"max_steps": 2}}
    run = cafe_ray.simulate(cfg, show_progress=False)
    scalars = _scalars(run.path / "tensorboard")
    assert sorted(scalars["train_loss"]) == [0, 1, 2]
    assert scalars["train_loss"][2] == pytest.approx(run.metrics["train_loss"].iloc[2], rel=1e-6)
    assert sorted(scalars["acc_avg_exit"]) == [1, 2]  # evaluation rounds only (every 2, and the last)
    assert scalars["acc_exit/1"][2] == pytest.approx(run.summary["acc_exit"][0], rel=1e-6)


def test_bad_configs_and_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"round\.num_rounds: Input should be greater than or equal to 1"):
        cafe_ray.simulate({"round": {"num_rounds": 0}}, show_progress=False)
    with pytest.raises(ConfigError, match=r"override 'round\.num_rounds\.x': 'num_rounds' is a value"):
        cafe_ray.simulate(str(QUICKSTART), overrides={"round.num_rounds.x": 1}, show_progress=False)
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        cafe_ray.Run.load(tmp_path)


def test_import_cafe_ray_loads_neither_the_api_nor_ray():
    code = ("import sys, cafe_ray; assert 'cafe_ray.api' not in sys.modules and 'ray' not in sys.modules; "
            "cafe_ray.Run; assert 'cafe_ray.api' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
