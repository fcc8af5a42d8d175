"""The round loop in-process (sequential executor): learning, clock, deadlines, failures."""

import json

import pytest

from cafe_ray.runs import rundir
from cafe_ray.sim.engine import run_simulation
from tests.sim.conftest import tiny_cfg


def _run(cfg):
    return run_simulation(cfg, show_progress=False)


@pytest.mark.parametrize("algo", ["fedavg_ee", "fedprox_ee", "fedper_ee", "local_ee"])
def test_each_algorithm_learns_sequential(tmp_path, algo):
    cfg = tiny_cfg(tmp_path, f"algorithm.name={algo}", "round.num_rounds=4", "round.fraction=1.0",
                   executor="sequential")
    run_dir, summary = _run(cfg)
    # 10 classes: chance is 10%
    assert summary["acc_avg_exit"] > 0.5, summary
    assert (run_dir / "metrics.parquet").exists() and (run_dir / "accuracy.png").exists()
    assert len(rundir.read_jsonl(run_dir / "metrics.jsonl")) == 4


def test_virtual_time_follows_profiles(tmp_path):
    slow = tiny_cfg(tmp_path, "executor=sequential", "round.num_rounds=1", "round.fraction=1.0")
    run_dir, s = _run(slow)
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    macs = s["exit_macs"]
    assert recs and all(r["status"] == "ok" for r in recs)
    # uniform catalog: 20 GFLOP/s, 50/10 Mbit/s
    from cafe_ray.config import load_config
    from cafe_ray.data import load_dataset
    from cafe_ray.models import exit_macs, make_model

    cfg = load_config(run_dir / "config.yaml")
    model = make_model(cfg, load_dataset(cfg.data))
    cost = exit_macs(model, (1, 8, 8))
    train_macs = sum(cost.stage_macs) + sum(cost.head_macs)
    for r in recs:
        expect = 3 * train_macs * r["samples"] / 2e10 + r["bytes_down"] * 8 / 50e6 + r["bytes_up"] * 8 / 10e6
        assert r["virtual_s"] == pytest.approx(expect, rel=1e-9)
    assert s["virtual_time_s"] == pytest.approx(max(r["virtual_s"] for r in recs))
    assert macs == list(cost.cumulative)


def test_slower_devices_take_longer(tmp_path):
    fast = tiny_cfg(tmp_path / "a", "executor=sequential", "round.num_rounds=1")
    _, s_fast = _run(fast)
    slow = tiny_cfg(tmp_path / "b", "executor=sequential", "round.num_rounds=1", "profiles.catalog=iot_mix",
                    "round.fraction=1.0")
    _, s_slow = _run(slow)
    assert s_slow["virtual_time_s"] > 3 * s_fast["virtual_time_s"], (s_slow, s_fast)


def test_deadline_drops_late_clients(tmp_path):
    cfg = tiny_cfg(tmp_path, "executor=sequential", "round.num_rounds=2", "profiles.catalog=iot_mix",
                   "round.fraction=1.0", "round.deadline_s=0.08")
    run_dir, s = _run(cfg)
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    late = [r for r in recs if r["status"] == "late"]
    assert late and all(r["virtual_s"] > 0.08 for r in late)
    assert s["dropped_late_total"] == len(late)
    for r in rundir.read_jsonl(run_dir / "metrics.jsonl"):
        assert r["round_virtual_s"] <= 0.08 + 1e-12


def test_trace_failures_are_reported(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"devices": [{"computation": 1.0, "communication": 10000.0, "failure_prob": 0.5}]}))
    cfg = tiny_cfg(tmp_path, "executor=sequential", "round.num_rounds=3", "round.fraction=1.0",
                   f"profiles.catalog={trace}", "profiles.actors_per_class=1")
    run_dir, s = _run(cfg)
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert failed and s["failed_total"] == len(failed)
    assert all("failure_prob" in r["reason"] for r in failed)
    assert s["rounds"] == 3


def test_same_seed_same_metrics_different_seed_differs(tmp_path):
    a = tiny_cfg(tmp_path / "a", "executor=sequential", "round.num_rounds=2")
    b = tiny_cfg(tmp_path / "b", "executor=sequential", "round.num_rounds=2")
    c = tiny_cfg(tmp_path / "c", "executor=sequential", "round.num_rounds=2", "seed=1")
    from tests.sim.conftest import comparable

    ra, _ = _run(a)
    rb, _ = _run(b)
    rc, _ = _run(c)
    ma, mb, mc = (comparable(rundir.read_jsonl(r / "metrics.jsonl")) for r in (ra, rb, rc))
    assert ma == mb and ma != mc


def test_validation_split_metrics_and_splits_file(tmp_path):
    cfg = tiny_cfg(tmp_path, "executor=sequential", "round.num_rounds=2", "round.fraction=1.0",
                   "data.val_fraction=0.2")
    run_dir, s = _run(cfg)
    assert 0.0 <= s["val_acc_avg_exit"] <= 1.0 and len(s["val_acc_exit"]) == len(s["acc_exit"])
    splits = rundir.load_splits(run_dir / "splits.npz")
    assert all(len(sp.val_idx) > 0 and not set(sp.val_idx) & set(sp.train_idx) for sp in splits)
    recs = [r for r in rundir.read_jsonl(run_dir / "eval.jsonl") if r["round"] == 1]
    assert all(r["num_val"] > 0 and len(r["val_acc_exit"]) == len(r["acc_exit"]) for r in recs)
    from cafe_ray.runs import RunArtifacts

    art = RunArtifacts(run_dir)
    x_val, y_val = art.client_data(0, "val")
    x_hold, y_hold = art.client_data(0, "holdout")
    assert len(y_val) == len(splits[0].val_idx) and len(y_hold) == len(splits[0].test_idx)
