"""`cafe-ray simulate` on a Parquet file, on real Ray with 2 client actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.runs import rundir
from tests.data.conftest import make_femnist_like

runner = CliRunner()


def _config(tmp_path: Path, data: dict, **top) -> Path:
    cfg = {"name": "femnist", "output_dir": str(tmp_path / "runs"),
           "data": {"name": "parquet", "path": str(tmp_path / "train.parquet"), "features": "pixels",
                    "shape": [1, 8, 8], "label": "label", **data},
           "model": {"name": "auto", "width": 8}, "algorithm": {"name": "fedavg_ee"},
           "round": {"num_rounds": 3, "eval_every": 3}, "train": {"batch_size": 16},
           "profiles": {"catalog": "uniform", "actors_per_class": 2}, **top}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _simulate(config: Path) -> tuple[Path, dict]:
    r = runner.invoke(app, ["simulate", str(config), "--no-progress"])
    assert r.exit_code == 0, r.output
    (run_dir,) = (config.parent / "runs").iterdir()
    return run_dir, json.loads((run_dir / rundir.SUMMARY).read_text())


@pytest.mark.slow  # a CLI run on Ray from Parquet files
@pytest.mark.usefixtures("ray_session")
def test_one_client_per_writer_end_to_end_on_ray(tmp_path):
    make_femnist_like(tmp_path / "train.parquet", writers=6, per_writer=24)
    run_dir, summary = _simulate(_config(tmp_path, {"client": "writer_id"}))
    assert summary["num_clients"] == 6 and summary["rounds"] == 3
    assert summary["acc_avg_exit"] > 0.5  # 4 classes: chance is 0.25
    saved = yaml.safe_load((run_dir / rundir.CONFIG).read_text())
    assert saved["data"]["num_clients"] == 6  # resolved once, so --resume reads the same clients
    stats = json.loads((run_dir / rundir.DATA_STATS).read_text())
    assert stats["clients"] == [f"f{w:04d}" for w in range(6)] and len(stats["mean"]) == 1
    splits = rundir.load_splits(run_dir / rundir.SPLITS)
    assert list(splits.train_sizes()) == [20] * 6 and list(splits.test_sizes()) == [4] * 6
    clients = rundir.read_jsonl(run_dir / rundir.CLIENTS)
    assert len({r["pid"] for r in clients}) == 2  # both actors of the pool trained clients


def test_the_same_table_without_a_client_column_uses_dirichlet(tmp_path):
    make_femnist_like(tmp_path / "train.parquet", writers=6, per_writer=24)
    run_dir, summary = _simulate(_config(tmp_path, {"num_clients": 4, "partition": {"kind": "dirichlet",
                                                                                   "alpha": 0.5}},
                                         executor="sequential"))
    assert summary["num_clients"] == 4
    sizes = rundir.load_splits(run_dir / rundir.SPLITS).train_sizes()
    assert len(sizes) == 4 and sizes.sum() == 120 and len(set(sizes.tolist())) > 1  # label skew, uneven


def _write(tmp_path: Path, table: pa.Table) -> None:
    pq.write_table(table, tmp_path / "train.parquet")


def _bad_cases(tmp_path: Path) -> list[tuple[str, pa.Table, dict]]:
    good = pq.read_table(make_femnist_like(tmp_path / "good.parquet", writers=3, per_writer=5))
    ragged = good.set_column(0, "pixels", pa.array([[1] * 64] * 3 + [[1] * 60] + [[1] * 64] * 11))
    return [
        ("data.features=image: no column 'image'", good, {"features": "image"}),
        ("data.features=pixels: ragged lists: row 3 has 60 values", ragged, {}),
        ("data.label=label: needs integer class ids", good.set_column(1, "label", pa.array(np.ones(15) / 2)), {}),
        ("data.client=writer_id: client 'z' has no test samples",
         good.set_column(2, "writer_id", pa.array(["a"] * 14 + ["z"])), {"client": "writer_id"}),
    ]


@pytest.mark.parametrize("case", range(4))
def test_a_bad_table_is_one_error_line_rc_2_before_ray_starts(tmp_path, monkeypatch, case):
    from cafe_ray.sim import engine

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a bad table")

    monkeypatch.setattr(engine, "ensure_ray", no_ray)
    message, table, data = _bad_cases(tmp_path)[case]
    _write(tmp_path, table)
    r = runner.invoke(app, ["simulate", str(_config(tmp_path, data)), "--no-progress"])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
