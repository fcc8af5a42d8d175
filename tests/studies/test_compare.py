"""A tiny study through the real comparison runner: table, parquet, plots, resume."""

import pyarrow.parquet as pq
import pytest
import yaml

from cafe_ray.config import ConfigError
from cafe_ray.studies.compare import load_study, run_study


def _study(tmp_path):
    base = {"executor": "sequential", "data": {"name": "digits", "num_clients": 4},
            "model": {"name": "cnn_small", "width": 8}, "round": {"num_rounds": 2, "eval_every": 1},
            "profiles": {"catalog": "uniform"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"base": "base.yaml", "grid": {"data.partition.alpha": [0.3, 1.0]},
             "variants": [{"label": "CAFEDistill", "set": {"algorithm.name": "cafedistill"}},
                          {"label": "FedPer-EE", "group": "baseline", "set": {"algorithm.name": "fedper_ee"}}]}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study))
    return p


def test_study_runs_writes_outputs_and_resumes(tmp_path):
    p = _study(tmp_path)
    out = tmp_path / "out"
    rows = run_study(p, out)
    assert len(rows) == 4 and {r["setting"] for r in rows} == {"alpha=0.3", "alpha=1.0"}
    md = (out / "results.md").read_text()
    assert "| CAFEDistill |" in md and "**alpha=0.3**" in md
    assert pq.read_table(out / "results.parquet").num_rows == 4
    assert (out / "comparison_alpha=0.3.png").read_bytes()[:4] == b"\x89PNG"
    # a second call runs nothing new: the same run directories come back
    again = run_study(p, out)
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows]
    # --only limits what runs, not what the table shows
    only = run_study(p, out, only=["FedPer-EE"])
    assert len(only) == 4 and pq.read_table(out / "results.parquet").num_rows == 4


def test_bad_variant_fails_before_running(tmp_path):
    p = _study(tmp_path)
    raw = yaml.safe_load(p.read_text())
    raw["variants"].append({"label": "typo", "set": {"algorithm.cafedistill.lamda": 1}})
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"lamda: unknown key"):
        load_study(p)
