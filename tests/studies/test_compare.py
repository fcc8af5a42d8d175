"""Comparison studies through the real runner: seeds, validation, paired tests, tuning, resume."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cafe_ray.config import ConfigError
from cafe_ray.studies.compare import aggregate, load_study, paired_comparison, run_study


def _study(tmp_path, **extra):
    base = {"executor": "sequential", "data": {"name": "digits", "num_clients": 4, "val_fraction": 0.2},
            "model": {"name": "cnn_small", "width": 8}, "round": {"num_rounds": 2, "eval_every": 1},
            "profiles": {"catalog": "uniform"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"base": "base.yaml", "grid": {"data.partition.alpha": [0.3, 1.0]},
             "variants": [{"label": "CAFEDistill", "set": {"algorithm.name": "cafedistill"}},
                          {"label": "FedPer-EE", "group": "baseline", "set": {"algorithm.name": "fedper_ee"}}],
             **extra}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study))
    return p


def test_study_runs_writes_outputs_and_resumes(tmp_path):
    p = _study(tmp_path)
    out = tmp_path / "out"
    rows = run_study(p, out)
    assert len(rows) == 4 and {r["setting"] for r in rows} == {"alpha=0.3", "alpha=1.0"}
    md = (out / "results.md").read_text()
    assert "| CAFEDistill |" in md and "**alpha=0.3**" in md and "test split" in md
    # the reference is the only baseline, chosen on validation; CAFEDistill is paired against it
    caf = next(r for r in rows if r["label"] == "CAFEDistill" and r["setting"] == "alpha=0.3")
    assert caf["reference"] == "FedPer-EE" and caf["paired"]["n"] == 4  # 4 clients x 1 seed
    assert caf["val_acc_avg_exit"] is not None and caf["samples_per_client_round"] > 0
    assert "vs FedPer-EE" in md and "(reference)" in md
    summary = md.split("## Per setting")[0]  # variants x settings, with the paired difference to the reference
    assert "| method | alpha=0.3 | alpha=1.0 | mean test | mean val |" in summary
    pd = caf["paired"]["mean_diff"] * 100
    assert f"({pd:+.2f}, p=" in summary and "| *reference* | *FedPer-EE* | *FedPer-EE* |" in summary
    assert pq.read_table(out / "results.parquet").num_rows == 4
    assert pq.read_table(out / "runs.parquet").num_rows == 4
    assert (out / "comparison_alpha=0.3.png").read_bytes()[:4] == b"\x89PNG"
    # a second call runs nothing new: the same run directories come back
    again = run_study(p, out)
    assert [r["run_dirs"] for r in again] == [r["run_dirs"] for r in rows]
    # --only limits what runs, not what the table shows
    only = run_study(p, out, only=["FedPer-EE"])
    assert len(only) == 4 and pq.read_table(out / "results.parquet").num_rows == 4


def test_seeds_give_mean_std_and_pairs_over_clients_and_seeds(tmp_path):
    p = _study(tmp_path, seeds=[0, 1], grid={"data.partition.alpha": [0.5]})
    rows = run_study(p, tmp_path / "out")
    caf = next(r for r in rows if r["label"] == "CAFEDistill")
    assert caf["seeds"] == [0, 1] and len(caf["run_dirs"]) == 2
    assert caf["paired"]["n"] == 8  # 4 clients x 2 seeds
    assert caf["acc_avg_exit_std"] is not None
    runs = pq.read_table(tmp_path / "out" / "runs.parquet").to_pylist()
    seed_accs = sorted(r["acc_avg_exit"] for r in runs if r["label"] == "CAFEDistill")
    assert caf["acc_avg_exit"] == pytest.approx(np.mean(seed_accs))
    assert caf["acc_avg_exit_std"] == pytest.approx(np.std(seed_accs, ddof=1))
    assert "± " in (tmp_path / "out" / "results.md").read_text()


def test_paired_comparison_on_a_crafted_example():
    from scipy.stats import wilcoxon

    b = {(s, c): 0.5 for s in range(2) for c in range(10)}
    a = {k: v + (0.1 if k[1] < 8 else -0.05) for k, v in b.items()}
    r = paired_comparison(a, b)
    assert (r["n"], r["wins"], r["losses"], r["ties"]) == (20, 16, 4, 0)
    assert r["mean_diff"] == pytest.approx((16 * 0.1 - 4 * 0.05) / 20)
    d = [a[k] - b[k] for k in sorted(a)]
    assert r["p_value"] == pytest.approx(wilcoxon(d).pvalue) and r["p_value"] < 0.01
    tie = paired_comparison(b, dict(b))
    assert tie["ties"] == 20 and tie["p_value"] == 1.0
    # only common (seed, client) keys are paired
    assert paired_comparison({(0, 1): 1.0}, {(1, 1): 0.0})["n"] == 0


def test_best_baseline_is_chosen_on_validation_not_test():
    def run(label, val, test):
        return {"setting": "s", "label": label, "group": "baseline", "seed": 0, "algorithm": label,
                "acc_exit": [test], "acc_avg_exit": test, "acc_worst_client": test, "val_acc_avg_exit": val,
                "cum_bytes": 0, "samples_per_client_round": 1.0, "wall_time_s": 1.0, "tuned": {},
                "run_dir": label, "curve": [], "per_client": {0: test}}

    rows = aggregate([run("A", val=0.9, test=0.5), run("B", val=0.8, test=0.99)])
    assert {r["reference"] for r in rows} == {"A"}  # B is better on test, A on validation


def test_bad_studies_fail_before_running(tmp_path):
    p = _study(tmp_path)
    raw = yaml.safe_load(p.read_text())
    raw["variants"].append({"label": "typo", "set": {"algorithm.cafedistill.lamda": 1}})
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"lamda: unknown key"):
        load_study(p)
    with pytest.raises(ConfigError, match=r"seeds must be"):
        load_study(_study(tmp_path, seeds=[0, 0]))
    with pytest.raises(ConfigError, match=r"reference='Nope' is not a variant"):
        load_study(_study(tmp_path, reference="Nope"))
    with pytest.raises(ConfigError, match=r"use 'choice'"):
        load_study(_study(tmp_path, tuning={"trials": 2, "space": {"train.lr": {"grid": [0.01, 0.1]}}}))
    p = _study(tmp_path, tuning={"trials": 2, "space": {"train.lr": {"choice": [0.01, 0.1]}}})
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["data"]["val_fraction"] = 0.0
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"data.val_fraction"):
        load_study(p)


@pytest.mark.slow  # a Tune sweep per variant, then the seed runs with the tuned values
def test_equal_budget_tuning_on_validation(tmp_path, ray_session):
    p = _study(tmp_path, grid={"data.partition.alpha": [0.5]},
               tuning={"trials": 2, "space": {"train.lr": {"choice": [0.01, 0.05]}}})
    raw = yaml.safe_load(p.read_text())
    raw["variants"][0]["tune"] = {"algorithm.cafedistill.lam": {"choice": [0.0, 0.5]}}
    p.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    rows = run_study(p, out)
    for r in rows:
        tdir = out / "tuning" / "alpha=0.5" / r["label"]
        best = json.loads((tdir / "best.json").read_text())
        trials = pq.read_table(tdir / "results.parquet").to_pylist()
        assert len(trials) == 2  # the same trial budget for every variant
        # the chosen values are the best validation trial's and are what the seed runs used
        top = max((t for t in trials if t["val_acc_avg_exit"] is not None), key=lambda t: t["val_acc_avg_exit"])
        assert best["trial_id"] == top["trial_id"] and r["tuned"] == best["params"]
        cfg = yaml.safe_load((Path(r["run_dirs"][0]) / "config.yaml").read_text())
        assert cfg["train"]["lr"] == r["tuned"]["train.lr"]
    assert set(rows[0]["tuned"]) == {"train.lr", "algorithm.cafedistill.lam"}
    assert "Tuned on validation" in (out / "results.md").read_text()


def test_named_grid_axis_expands_bundles(tmp_path):
    from cafe_ray.studies.compare import config_for, setting_name, settings

    p = _study(tmp_path, grid={"fleet": {"small": {"data.num_clients": 4},
                                         "partial": {"data.num_clients": 6, "round.fraction": 0.5}},
                               "data.partition.alpha": [0.3]})
    study = load_study(p)
    names = [setting_name(s) for s in settings(study)]
    assert sorted(names) == ["alpha=0.3,fleet=partial", "alpha=0.3,fleet=small"]  # YAML key order
    partial = next(s for s in settings(study) if s["fleet"] == "partial")
    cfg = config_for(study, partial, study.variants[0], tmp_path, 0)
    assert cfg.data.num_clients == 6 and cfg.round.fraction == 0.5 and cfg.data.partition.alpha == 0.3
    with pytest.raises(ConfigError, match=r"grid.fleet: a named axis"):
        load_study(_study(tmp_path, grid={"fleet": {"small": 3}}))


def test_a_changed_config_is_rerun_not_reused(tmp_path):
    p = _study(tmp_path, grid={"data.partition.alpha": [0.5]})
    out = tmp_path / "out"
    first = {r["label"]: r for r in run_study(p, out, only=["FedPer-EE"])}
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["round"]["num_rounds"] = 1  # e.g. a default changed since the run
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    again = {r["label"]: r for r in run_study(p, out, only=["FedPer-EE"])}
    assert again["FedPer-EE"]["run_dirs"] != first["FedPer-EE"]["run_dirs"]
    runs = pq.read_table(out / "runs.parquet").to_pylist()
    assert [len(json.loads(r["curve"])) for r in runs] == [1]  # the 1-round run, not the stale 2-round one


def test_rows_with_missing_seeds_are_marked():
    from cafe_ray.studies.compare import markdown_table

    def run(label, seed, acc):
        return {"setting": "s", "label": label, "group": "baseline", "seed": seed, "algorithm": label,
                "acc_exit": [acc], "acc_avg_exit": acc, "acc_worst_client": acc, "val_acc_avg_exit": acc,
                "cum_bytes": 0, "samples_per_client_round": 1.0, "wall_time_s": 1.0, "tuned": {},
                "run_dir": label, "curve": [], "per_client": {0: acc}}

    md = markdown_table(aggregate([run("A", 0, 0.5), run("A", 1, 0.6), run("B", 0, 0.4)]))
    assert "| B (1 of 2 seeds) |" in md and "| A |" in md


def test_cache_ignores_other_algorithms_sections_but_not_the_runs_own(tmp_path):
    from cafe_ray.config import build_config
    from cafe_ray.runs import rundir
    from cafe_ray.studies.compare import same_run

    def saved(algorithm: dict) -> Path:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        raw = build_config({"algorithm": algorithm}).model_dump(mode="json")
        (run / rundir.CONFIG).write_text(yaml.safe_dump(raw))
        return run

    fedrod = saved({"name": "fedrod_ee"})
    now = build_config({"algorithm": {"name": "fedrod_ee", "cafedistill": {"lam": 0.7}}})
    assert same_run(fedrod, now)  # another algorithm's hyperparameter cannot change a FedRoD run
    assert not same_run(fedrod, build_config({"algorithm": {"name": "fedrod_ee", "fedrod": {"personal_init": "generic"}}}))
    # a CAFEDistill run whose saved config predates a CAFEDistill field is stale where the value differs
    cafe = saved({"name": "cafedistill"})
    raw = yaml.safe_load((cafe / rundir.CONFIG).read_text())
    del raw["algorithm"]["cafedistill"]["heads"]
    (cafe / rundir.CONFIG).write_text(yaml.safe_dump(raw))
    assert not same_run(cafe, build_config({"algorithm": {"name": "cafedistill",
                                                          "cafedistill": {"heads": "generic_residual"}}}))
    # ... unless the field has the value that reproduces runs made before it existed
    assert same_run(cafe, build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"heads": "personal"}}}))
    raw["algorithm"]["cafedistill"].pop("kd_gate")  # a field with no legacy value: stale
    (cafe / rundir.CONFIG).write_text(yaml.safe_dump(raw))
    assert not same_run(cafe, build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"heads": "personal"}}}))
    # while a FedRoD run saved before that field existed is still reused
    raw = yaml.safe_load((fedrod / rundir.CONFIG).read_text())
    del raw["algorithm"]["cafedistill"]["heads"]
    (fedrod / rundir.CONFIG).write_text(yaml.safe_dump(raw))
    assert same_run(fedrod, now)


def test_run_name_keeps_run_directories_when_a_label_changes(tmp_path):
    from cafe_ray.studies.compare import config_for, settings

    p = _study(tmp_path, grid={"data.partition.alpha": [0.5]})
    out = tmp_path / "out"
    first = {r["label"]: r for r in run_study(p, out, only=["FedPer-EE"])}
    raw = yaml.safe_load(p.read_text())
    raw["variants"][1] = {"label": "FedPer-EE (renamed)", "group": "baseline", "run_name": "FedPer-EE",
                          "set": {"algorithm.name": "fedper_ee"}}
    p.write_text(yaml.safe_dump(raw))
    study = load_study(p)
    assert config_for(study, settings(study)[0], study.variants[1], out).name == "FedPer-EE"
    again = {r["label"]: r for r in run_study(p, out, only=["FedPer-EE (renamed)"])}
    assert again["FedPer-EE (renamed)"]["run_dirs"] == first["FedPer-EE"]["run_dirs"]  # reused, not rerun
    raw["variants"][1]["run_name"] = "bad name/.."
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="run_name"):
        load_study(p)
    raw["variants"][1]["run_name"] = "CAFEDistill"  # would share the first variant's run directories
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="share a run directory"):
        load_study(p)


@pytest.mark.slow  # a study run three ways, simulate subprocesses included
def test_parallel_jobs_give_the_same_runs_as_in_process_and_ray_runs_are_reused(tmp_path):
    """--jobs 2 runs each simulation in its own `cafe-ray simulate` process: the same metrics as the
    in-process path; --set reaches every run; the executor is not part of a run's identity."""
    p = _study(tmp_path)
    serial = {(r["setting"], r["label"]): r for r in run_study(p, tmp_path / "serial")}
    out = tmp_path / "par"
    par = {(r["setting"], r["label"]): r for r in run_study(p, out, jobs=2, overrides=["train.lr=0.05"])}
    assert par.keys() == serial.keys()
    for key, row in par.items():
        assert row["acc_avg_exit"] == serial[key]["acc_avg_exit"], key
    logs = sorted((out / "configs").glob("*.log"))
    assert len(logs) == 4 and all(y.with_suffix(".yaml").is_file() for y in logs)
    # the same study on the Ray executor finds every run done (no new run directory)
    again = run_study(p, out, overrides=["executor=ray"])
    assert [r["run_dirs"] for r in again] == [par[(r["setting"], r["label"])]["run_dirs"] for r in again]
    with pytest.raises(ConfigError, match="--jobs"):
        run_study(p, out, jobs=0)
    with pytest.raises(ConfigError, match="num_rounds"):
        run_study(p, out, overrides=["round.num_rounds=0"])


def test_trust_pickles_reaches_the_tuning_sweep(tmp_path, monkeypatch):
    """compare --trust-pickles is handed to the tuning sweep's resume check (which the signing tests
    exercise for real); without it a resumed tuning sweep checks its signatures."""
    import cafe_ray.studies.sweep as sweep_mod

    seen: list[bool] = []

    class Stop(Exception):
        pass

    def fake_run_sweep(*args, trust_pickles=False, **kw):
        seen.append(trust_pickles)
        raise Stop

    monkeypatch.setattr(sweep_mod, "run_sweep", fake_run_sweep)
    monkeypatch.setattr("cafe_ray.sim.engine.ensure_ray", lambda *a, **k: False)
    p = _study(tmp_path, tuning={"trials": 2, "space": {"train.lr": {"choice": [0.01, 0.05]}}})
    for trust in (False, True):
        with pytest.raises(Stop):
            run_study(p, tmp_path / "out", trust_pickles=trust)
    assert seen == [False, True]


def test_a_run_made_by_another_version_is_not_reused(tmp_path):
    """Each run records the code that made it; the cache never mixes versions."""
    p = _study(tmp_path, grid={"data.partition.alpha": [0.5]})
    out = tmp_path / "out"
    first = {r["label"]: r for r in run_study(p, out)}
    made = json.loads((Path(first["FedPer-EE"]["run_dirs"][0]) / "provenance.json").read_text())
    assert made["cafe_ray"] and made["torch"] and made["python"]
    runs = pq.read_table(out / "runs.parquet").to_pylist()
    assert all(r["made_by"].startswith(f"cafe-ray {made['cafe_ray']}") for r in runs)
    stale = Path(first["FedPer-EE"]["run_dirs"][0]) / "provenance.json"
    stale.write_text(json.dumps({**made, "cafe_ray": "0.0.1"}))
    again = {r["label"]: r for r in run_study(p, out)}
    assert again["FedPer-EE"]["run_dirs"] != first["FedPer-EE"]["run_dirs"]  # made again by this version
    assert again["CAFEDistill"]["run_dirs"] == first["CAFEDistill"]["run_dirs"]  # reused
