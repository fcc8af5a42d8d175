import pytest

from cafe_ray.config import ConfigError, apply_overrides, build_config, dump_config, load_config


def test_defaults_are_valid():
    cfg = build_config({})
    assert cfg.data.name == "digits" and cfg.algorithm.name == "fedavg_ee"


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match=r"data\.partiton: unknown key"):
        build_config({"data": {"partiton": {}}})


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"data\.name: unknown data 'mnist'; allowed: digits, .*parquet, an "
                                          r"installed entry point \(cafe_ray\.datasets\) or your own "
                                          r"package\.module:Name$"):
        build_config({"data": {"name": "mnist"}})
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'vgg'; allowed: auto, cnn_small"):
        build_config({"model": {"name": "vgg"}})
    assert build_config({"model": {"name": "my_fl:mlp_ee"}}).model.name == "my_fl:mlp_ee"  # checked on use


def test_parquet_needs_its_table_and_features():
    with pytest.raises(ConfigError, match=r"data: data\.name=parquet needs data\.path and data\.features"):
        build_config({"data": {"name": "parquet"}})
    with pytest.raises(ConfigError, match=r"data\.shape=\[1, 0, 2\]: need positive sizes"):
        build_config({"data": {"name": "parquet", "path": "x", "features": "f", "shape": [1, 0, 2]}})


def test_out_of_range_value_names_field():
    with pytest.raises(ConfigError, match=r"round\.fraction: Input should be less than or equal to 1"):
        build_config({"round": {"fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"data\.partition\.alpha: Input should be greater than 0"):
        build_config({"data": {"partition": {"alpha": 0}}})


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["round.num_rounds=7", "algorithm.cafedistill.selection.order=deep_first",
                               "data.partition={kind: iid}", "round.deadline_s=null"])
    cfg = build_config(raw)
    assert cfg.round.num_rounds == 7
    assert cfg.algorithm.cafedistill.selection.order == "deep_first"
    assert cfg.data.partition.kind == "iid"
    assert cfg.round.deadline_s is None


def test_override_without_equals_explains():
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        apply_overrides({}, ["round.num_rounds"])


def test_override_into_a_value_explains():
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(broken)


def test_dump_roundtrips(tmp_path):
    cfg = build_config({"name": "x", "round": {"num_rounds": 3}})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_shipped_configs_and_studies_validate():
    from pathlib import Path

    import yaml

    from cafe_ray.studies.compare import load_study

    for p in sorted((Path(__file__).parent.parent / "simulations").glob("*.yaml")):
        raw = yaml.safe_load(p.read_text())
        if "variants" in raw:
            load_study(p)  # a comparison study: every (setting, variant) config validates
        elif not p.name.startswith("sweep_"):
            load_config(p)
