"""Ray Tune sweeps: the space format, trial resources, fitting pools to a placement
group, and a tiny sweep (interrupted, then resumed) writing its table and best config."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml
from ray.tune import Callback

from cafe_ray.config import ConfigError, load_config
from cafe_ray.runs import rundir
from cafe_ray.studies.sweep import (
    check_space,
    load_space,
    run_sweep,
    trial_bundles,
    trial_config,
    tune_metrics,
    validate_against,
)

ROOT = Path(__file__).resolve().parents[2]


def _base(tmp_path: Path, **top) -> dict:
    raw = {
        "name": "tiny", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 1.0, "min_size": 20}},
        "model": {"name": "cnn_small", "width": 8},
        # pinned: the resume test's scenario (ASHA stops the third trial at round 2) follows these curves
        "algorithm": {"name": "cafedistill", "cafedistill": {"residual_ce": "detached", "residual_generic": "live",
                                                        "lam": 3.0}},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "max_steps": 8},
        "round": {"num_rounds": 2, "fraction": 1.0, "eval_every": 1},
        "profiles": {"catalog": "uniform", "actors_per_class": 1},
        "checkpoint": {"every": 1, "keep": 1},
    }
    raw.update(top)
    return raw


# ------------------------------------------------------------------ the space
def test_space_accepts_every_tune_kind_and_fixed_values():
    space = {"a.grid": {"grid": [1, 2]}, "a.choice": {"choice": ["x"]}, "a.u": {"uniform": [0, 1]},
             "a.lu": {"loguniform": [0.01, 1]}, "a.ri": {"randint": [1, 4]}, "a.fixed": 3}
    assert check_space(space) == space


@pytest.mark.parametrize(("spec", "match"), [
    ([0.1, 0.2], "bare list is ambiguous"),
    ({"normal": [0, 1]}, "a search space is one of"),
    ({"grid": []}, "grid needs a non-empty list"),
    ({"uniform": [1.0]}, r"uniform needs \[low, high\] numbers"),
    ({"uniform": [2.0, 1.0]}, "needs low < high"),
    ({"loguniform": [0.0, 1.0]}, "loguniform needs low > 0"),
    ({"randint": [1.5, 4]}, "randint needs integer bounds"),
])
def test_space_errors_say_what_is_wrong(spec, match):
    with pytest.raises(ConfigError, match=match):
        check_space({"algorithm.cafedistill.lam": spec})


def test_space_must_be_a_non_empty_mapping():
    with pytest.raises(ConfigError, match="maps dotted config keys"):
        check_space([])


def test_space_keys_and_values_are_checked_against_the_config(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)algorithm.cafedistil.lam=0.5 does not make a valid config.*unknown key"):
        validate_against(base, {"algorithm.cafedistil.lam": {"grid": [0.5]}})
    with pytest.raises(ConfigError, match=r"(?s)algorithm.cafedistill.tau=0.0 .*greater than 0"):
        validate_against(base, {"algorithm.cafedistill.tau": {"uniform": [0.0, 3.0]}})


def test_trial_config_sets_dotted_fields(tmp_path):
    cfg = trial_config(_base(tmp_path), {"algorithm.cafedistill.lam": 0.25, "train.lr": 0.1}, name="x")
    assert (cfg.algorithm.cafedistill.lam, cfg.train.lr, cfg.name) == (0.25, 0.1, "x")


def test_shipped_cafedistill_sweep_is_valid():
    space = load_space(ROOT / "simulations" / "sweep_cafedistill.yaml")
    assert {"algorithm.cafedistill.lam", "algorithm.cafedistill.tau", "algorithm.cafedistill.mu"} <= set(space)
    base = load_config(ROOT / "simulations" / "sweep_base.yaml").model_dump(mode="json")
    assert base["algorithm"]["name"] == "cafedistill"
    validate_against(base, space)


# ------------------------------------------------------------ trial resources
def test_trial_bundles_one_per_client_actor_with_its_class_resources(tmp_path):
    cfg = trial_config(_base(tmp_path), {
        "profiles.catalog": "iot_mix", "profiles.actors_per_class": 2,
        "profiles.classes": {"edge_gpu": {"num_gpus": 0.5, "resources": {"edge_gpu": 1}, "actors": 1}}})
    bundles = trial_bundles(cfg)
    assert bundles[0] == {}  # the trial process (its round loop) reserves nothing by default
    assert bundles[1:] == [{"CPU": 0.5}] * 2 + [{"CPU": 0.25}] * 2 + [{"CPU": 1.0, "GPU": 0.5, "edge_gpu": 1.0}]
    assert trial_bundles(cfg, coordinator_cpus=0.5)[0] == {"CPU": 0.5}
    seq = trial_config(_base(tmp_path), {"executor": "sequential"})
    assert trial_bundles(seq) == [{"CPU": 1.0}]


def test_tune_metrics_are_scalars_with_rounds_completed():
    rec = {"round": 3, "acc_exit": [0.5, 0.7], "acc_avg_exit": 0.6, "acc_worst_client": 0.4,
           "train_loss": None, "cum_bytes_down": 10, "cum_bytes_up": 5}
    m = tune_metrics(rec)
    assert m["round"] == 4 and m["acc_exit_1"] == 0.5 and m["acc_exit_2"] == 0.7
    assert m["cum_bytes"] == 15 and "train_loss" not in m


def test_executor_fits_pools_to_the_current_placement_group(ray_session):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cafe_ray.sim.executor import fit_capacity

    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5, "cafe_test": 1}])
    ray.get(pg.ready(), timeout=60)
    try:
        inside = ray.remote(fit_capacity).options(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
        capacity, where = ray.get(inside.remote(), timeout=60)
        assert where == "placement group"
        assert capacity == {"CPU": 0.5, "cafe_test": 1.0}  # both bundles minus what the caller holds
    finally:
        remove_placement_group(pg)
    assert fit_capacity()[1] == "cluster"


# ------------------------------------------------------------------ the sweep
_INTERRUPTS = {"left": 1}  # module state: a restored copy of the callback must not fire again


class _InterruptAfterFirstTrial(Callback):
    """Sends Tune its own stop-and-save signal (as Ctrl+C would) once the first trial completes."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _INTERRUPTS["left"] > 0:
            _INTERRUPTS["left"] -= 1
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow  # a Tune sweep interrupted and resumed
def test_sweep_interrupted_then_resumed_writes_table_and_best_config(tmp_path, ray_session):
    base = _base(tmp_path)
    space = {"algorithm.cafedistill.lam": {"grid": [0.0, 0.5, 1.0]}, "algorithm.cafedistill.tau": {"choice": [2.0]}}
    out = tmp_path / "sweep"
    first = run_sweep(base, space, out, callbacks=[_InterruptAfterFirstTrial()], verbose=0)
    assert first.interrupted
    assert sum(r["status"] == "unfinished" for r in first.rows) >= 1
    with pytest.raises(ConfigError, match="already holds a sweep"):
        run_sweep(base, space, out, verbose=0)
    with pytest.raises(ConfigError, match="differ from the sweep saved"):
        run_sweep(base, {**space, "train.lr": 0.1}, out, resume=True, verbose=0)

    res = run_sweep(base, space, out, resume=True, verbose=0)
    assert not res.interrupted
    assert len(res.rows) == 3
    assert sorted(r["algorithm.cafedistill.lam"] for r in res.rows) == [0.0, 0.5, 1.0]
    assert {r["status"] for r in res.rows} <= {"completed", "stopped (ASHA)"}
    assert res.rows[0]["status"] == "completed" and res.best is res.rows[0]
    for r in res.rows:
        assert 1 <= r["rounds"] <= 2 and 0.0 <= r["acc_avg_exit"] <= 1.0
        rounds = [m["round"] for m in rundir.read_jsonl(Path(r["run_dir"]) / "metrics.jsonl")]
        assert rounds == sorted(set(rounds))  # a resumed trial never repeats a round
    done = [r for r in res.rows if r["status"] == "completed"]
    assert all((Path(r["run_dir"]) / "summary.json").is_file() for r in done)

    for key in ("results_md", "results_csv", "results_parquet", "best_config", "best_json"):
        assert res.paths[key].is_file(), key
    md = res.paths["results_md"].read_text()
    assert "algorithm.cafedistill.lam" in md and "avg exit %" in md and md.count(res.rows[0]["trial_id"]) == 1
    best = load_config(res.paths["best_config"])  # ready to run: a valid config
    assert best.algorithm.cafedistill.lam == res.best["algorithm.cafedistill.lam"]
    assert best.name == "tiny-best" and best.output_dir == base["output_dir"]


def test_cli_sweep_and_centralized_reject_bad_input_before_starting_ray(tmp_path):
    from typer.testing import CliRunner

    from cafe_ray.cli import app

    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_base(tmp_path)))
    r = runner.invoke(app, ["sweep", str(cfg), "--space", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "sweep space not found" in r.output
    space = tmp_path / "s.yaml"
    space.write_text("train.lr: [0.01, 0.1]\n")
    r = runner.invoke(app, ["sweep", str(cfg), "--space", str(space)])
    assert r.exit_code == 2 and "bare list is ambiguous" in r.output
    r = runner.invoke(app, ["centralized", str(cfg), "--set", "train.lr=-1"])
    assert r.exit_code == 2 and "train.lr" in r.output


# ------------------------------------------------------- exact resume (ASHA)
_STOP_AT = {"left": 1}  # module state: the restored sweep must not be interrupted again


class _InterruptAtThirdTrialsFirstReport(Callback):
    """Ctrl+C (Tune's SIGUSR1) as soon as the third trial reports its first evaluation."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _STOP_AT["left"] > 0 and trials.index(trial) == 2:
            _STOP_AT["left"] -= 1
            os.kill(os.getpid(), signal.SIGUSR1)


class _StopAfterCheckpoint(Exception):
    pass


def _outcome(res) -> dict:
    return {r["train.lr"]: (r["status"], r["rounds"], round(r["acc_avg_exit"], 6)) for r in res.rows}


@pytest.mark.slow  # an interrupted Tune sweep, its resume and an uninterrupted one
def test_resumed_sweep_stops_the_same_trials_as_an_uninterrupted_one(tmp_path, ray_session):
    """A trial interrupted between a checkpoint and its report is re-reported, and ASHA's rungs are
    rebuilt from the finished trials: early stopping decides exactly as without the interruption."""
    from cafe_ray.sim.engine import run_here
    from cafe_ray.studies.sweep import checkpointed_evaluations, reported_histories

    base = _base(tmp_path, round={"num_rounds": 4, "fraction": 1.0, "eval_every": 1},
                 checkpoint={"every": 1, "keep": 4})
    space = {"train.lr": {"grid": [0.05, 0.0005, 0.2]}}  # the third: stopped at round 2
    kw = {"grace_period": 1, "reduction_factor": 2.0, "max_concurrent_trials": 1, "verbose": 0}
    full = run_sweep(base, space, tmp_path / "full", **kw)
    assert not full.interrupted
    assert any(r["status"] == "stopped (ASHA)" for r in full.rows), _outcome(full)

    out = tmp_path / "cut"
    first = run_sweep(base, space, out, callbacks=[_InterruptAtThirdTrialsFirstReport()], **kw)
    assert first.interrupted
    finished, pending = reported_histories(out / "tune", "acc_avg_exit")
    assert len(finished) == 2 and pending, (finished, pending)
    # the third trial: Tune has its first report; its run goes one round further, checkpoints
    # it, and stops before reporting it (as a Ctrl+C between the two would)
    cut = next(r for r in first.rows if r["status"] == "unfinished" and Path(r["run_dir"]).is_dir())
    run_dir = Path(cut["run_dir"])
    cfg = load_config(run_dir / "config.yaml")
    reported = cut["rounds"]
    done_before = len(checkpointed_evaluations(run_dir, cfg.round.num_rounds - 1))

    def stop(rec: dict) -> None:
        if rec["round"] + 1 > max(reported, done_before):
            raise _StopAfterCheckpoint

    with pytest.raises(_StopAfterCheckpoint):
        run_here(cfg, run_dir, resume=done_before > 0, on_round=stop)
    unreported = [r["round"] + 1 for r in checkpointed_evaluations(run_dir, cfg.round.num_rounds - 1)]
    assert max(unreported) > reported  # checkpointed, never reported to Tune

    resumed = run_sweep(base, space, out, resume=True, **kw)
    assert not resumed.interrupted
    assert _outcome(resumed) == _outcome(full)


def test_a_class_no_node_can_host_fails_fast_naming_it(tmp_path, ray_session):
    base = _base(tmp_path)
    space = {"profiles.classes": {"grid": [{"default": {"resources": {"no_such_device": 1}}}]}}
    with pytest.raises(ConfigError, match=r"class 'default' .*no_such_device.* no autoscaler"):
        run_sweep(base, space, tmp_path / "s", verbose=0)
    assert not (tmp_path / "s" / "tune").exists()  # refused before Tune started


def test_cli_sweep_checks_resume_and_asha_settings_before_ray(tmp_path):
    from typer.testing import CliRunner

    from cafe_ray.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_base(tmp_path)))
    space = tmp_path / "s.yaml"
    space.write_text("train.lr: {grid: [0.01, 0.1]}\n")
    r = CliRunner().invoke(app, ["sweep", str(cfg), "--space", str(space), "--out", str(tmp_path / "none"),
                                 "--resume"])
    assert r.exit_code == 2 and "no sweep to continue" in r.output
    r = CliRunner().invoke(app, ["sweep", str(cfg), "--space", str(space), "--reduction-factor", "1"])
    assert r.exit_code == 2 and "--reduction-factor must be > 1" in r.output


# ------------------------------------------------- reproducible concurrent sweeps
class _MostRunningAtOnce(Callback):
    """The most trials Tune held RUNNING at one step of its loop: trials overlap when it is 2 or more.
    (Tune's result timestamps count whole seconds, too coarse to order short trials.)"""

    def __init__(self) -> None:
        self.most = 0

    def on_step_end(self, iteration: int, trials: list, **info: object) -> None:
        self.most = max(self.most, sum(t.status == "RUNNING" for t in trials))


@pytest.mark.slow  # two Tune sweeps of four trials each (862 s on the shared 2-core machine)
@pytest.mark.timeout(1500)  # two sweeps of four trials
def test_a_concurrent_sweep_run_twice_stops_the_same_trials_at_the_same_rungs(tmp_path, ray_session):
    base = _base(tmp_path, round={"num_rounds": 3, "fraction": 1.0, "eval_every": 1})
    # a grid and a sampled value (drawn from the base seed); default concurrency: as many as fit
    space = {"train.lr": {"grid": [0.05, 0.0005, 0.2, 0.01]}, "algorithm.cafedistill.tau": {"uniform": [1.0, 4.0]}}
    kw = {"grace_period": 1, "reduction_factor": 2.0, "verbose": 0}
    running = _MostRunningAtOnce()
    runs = [run_sweep(base, space, tmp_path / name, callbacks=cbs, **kw)
            for name, cbs in (("first", [running]), ("second", []))]

    def outcome(res) -> dict:
        return {(r["train.lr"], r["algorithm.cafedistill.tau"]): (r["status"], r["rounds"], round(r["acc_avg_exit"], 6))
                for r in res.rows}

    assert outcome(runs[0]) == outcome(runs[1])
    assert any(r["status"] == "stopped (ASHA)" for r in runs[0].rows), outcome(runs[0])
    assert {k: runs[0].best[k] for k in space} == {k: runs[1].best[k] for k in space}  # trial ids differ per run
    assert load_config(runs[0].paths["best_config"]).model_dump() == load_config(runs[1].paths["best_config"]).model_dump()
    assert running.most >= 2, running.most  # the trials did run concurrently
