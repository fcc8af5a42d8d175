"""Run directories saved before a config field existed load as they were made."""

import yaml

from cafe_ray.config import build_config, load_saved_config
from cafe_ray.runs import rundir


def test_saved_config_without_a_newer_field_gets_its_legacy_value(tmp_path):
    raw = build_config({"algorithm": {"name": "cafedistill"}}).model_dump(mode="json")
    assert raw["algorithm"]["cafedistill"]["heads"] == "generic_residual"  # today's default
    for key in ("heads", "residual_init", "kd_last_exit"):
        del raw["algorithm"]["cafedistill"][key]
    (tmp_path / rundir.CONFIG).write_text(yaml.safe_dump(raw))
    cfg = load_saved_config(tmp_path / rundir.CONFIG)
    assert cfg.algorithm.cafedistill.heads == "personal"  # what such a run trained
    assert cfg.algorithm.cafedistill.kd_last_exit is False
    raw["algorithm"]["cafedistill"]["heads"] = "generic_residual"  # a value it did save wins
    (tmp_path / rundir.CONFIG).write_text(yaml.safe_dump(raw))
    assert load_saved_config(tmp_path / rundir.CONFIG).algorithm.cafedistill.heads == "generic_residual"
