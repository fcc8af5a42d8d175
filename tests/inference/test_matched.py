"""Equal-MAC comparison: paired bootstrap, curve interpolation, val matching, the CLI on a tiny run."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.inference import ExitTrace, save_policy
from cafe_ray.inference.budget import calibrate_threshold
from cafe_ray.inference.cascade import FitSettings, fit_for_run, save_cascade
from cafe_ray.inference.matched import (
    curve_at,
    curve_bootstrap,
    equal_mac_comparison,
    markdown_equal_macs,
    paired_bootstrap,
    resample_counts,
)
from cafe_ray.runs import RunArtifacts
from tests.inference.test_learned import random_mlp


# ------------------------------------------------------------------ statistics
def test_paired_bootstrap_on_a_crafted_difference():
    """100 paired samples, 10 where only `a` is right: the difference is 0.1 and every resample's
    difference is (discordant draws)/100, Binomial(100, 0.1)/100: sd 0.03."""
    a = np.ones(100)
    b = np.r_[np.zeros(10), np.ones(90)]
    ci = paired_bootstrap(a, b, resamples=2000, seed=3)
    assert ci.value == pytest.approx(0.1)
    assert 0.02 < ci.lo < 0.1 < ci.hi < 0.18
    assert (ci.hi - ci.lo) == pytest.approx(2 * 1.96 * 0.03, abs=0.015)
    assert paired_bootstrap(a, b, resamples=2000, seed=3) == ci  # seeded: reproducible
    same = paired_bootstrap(b, b, resamples=200)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    # pairing matters: the same marginal accuracies, but discordant on every sample
    c = np.r_[np.ones(50), np.zeros(50)]
    wide = paired_bootstrap(c, 1 - c, resamples=2000, seed=3)
    assert wide.value == 0.0 and wide.hi - wide.lo > 0.3


def test_paired_bootstrap_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(np.ones(5), np.ones(6))


def test_resample_counts_draw_n_samples_each():
    chunks = list(resample_counts(7, 250, seed=0, chunk=100))
    assert [c.shape for c in chunks] == [(100, 7), (100, 7), (50, 7)]
    assert all((c.sum(axis=1) == 7).all() for c in chunks)


def test_curve_at_interpolates_and_averages_ties():
    macs = np.array([100, 300, 300, 500])
    acc = np.array([0.5, 0.7, 0.9, 0.9])  # two points at 300 MACs -> 0.8
    assert curve_at(macs, acc, 200) == pytest.approx(0.65)
    assert curve_at(macs, acc, 400) == pytest.approx(0.85)
    assert curve_at(macs, acc, 50) == pytest.approx(0.5) and curve_at(macs, acc, 900) == pytest.approx(0.9)


def test_curve_bootstrap_of_a_point_on_the_curve_is_zero():
    """A policy identical (per sample) to one curve point: every resample reads the curve at that
    point's own MACs, so the difference is exactly 0, interval included."""
    rng = np.random.default_rng(0)
    n = 200
    macs = np.stack([np.full(n, 100), rng.choice([100, 300], n), np.full(n, 300)])
    correct = np.stack([rng.random(n) < p for p in (0.6, 0.75, 0.9)])
    ci, ref = curve_bootstrap(correct[1], macs[1], correct, macs, resamples=300, seed=1)
    assert ref == pytest.approx(correct[1].mean())
    assert ci.value == pytest.approx(0.0, abs=1e-12)
    assert ci.lo == pytest.approx(0.0, abs=1e-12) and ci.hi == pytest.approx(0.0, abs=1e-12)
    # one more right answer at the same cost: +1/n, and the interval stays above 0
    better = correct[1].copy()
    better[np.flatnonzero(~better)[0]] = True
    ci2, _ = curve_bootstrap(better, macs[1], correct, macs, resamples=300, seed=1)
    assert ci2.value == pytest.approx(1 / n) and ci2.lo >= 0.0


# ------------------------------------------------------------------ on a tiny run
@pytest.fixture(scope="module")
def art(run_dir):
    return RunArtifacts(run_dir)


@pytest.fixture(scope="module")
def cascade_path(art, tmp_path_factory):
    net = fit_for_run(art, FitSettings(hidden=(8,), steps=50, seed=0))
    w, _ = save_cascade(net, tmp_path_factory.mktemp("cascade") / "policy")
    return w


def test_equal_mac_matching_on_a_run(art, cascade_path):
    r = equal_mac_comparison(art, cascade_path, budgets=[0.3, 0.8], resamples=50, seed=0)
    assert r.kind == "cascade" and [p.budget for p in r.points] == [0.3, 0.8]
    n = sum(art.client_data(c, "holdout")[1].shape[0] for c in r.clients)
    assert r.n == n and r.full_macs == art.exit_cost.cumulative[-1]
    val = ExitTrace.concat([ExitTrace.from_run(art, c, "val") for c in r.clients])
    for p in r.points:
        pv, g = p.policy_val["mean_macs"], p.global_threshold
        # the global threshold is the largest whose val MACs fit in the policy's val MACs
        t = math.inf if g["threshold"] is None else g["threshold"]
        assert (t, g["val_macs"]) == calibrate_threshold(val, pv)
        assert g["val_macs"] <= pv + 1e-9
        assert p.knob["calibrated_val_macs"] <= p.budget * r.full_macs + 1e-9
        assert p.policy["trace_mismatches"] == 0  # predict_batch == the same policy on traces
        assert p.curve["at_macs"] == p.policy["mean_macs"]
        for block in (g, p.client_thresholds, p.curve):
            d = block["diff"]
            assert d.lo <= d.value <= d.hi
        assert p.global_threshold["diff"].value == pytest.approx(p.policy["accuracy"] - g["accuracy"])
    assert r.points[0].policy["mean_macs"] < r.points[1].policy["mean_macs"]
    assert "| 30% |" in markdown_equal_macs(r)
    assert json.loads(json.dumps(r.to_json()))["points"][0]["global_threshold"]["diff"]["level"] == 0.95


def test_rl_policy_has_one_operating_point(art, tmp_path):
    w, _ = save_policy(random_mlp(num_classes=10, budget=1.0), tmp_path / "rl")
    r = equal_mac_comparison(art, w, resamples=20, clients=[0, 1])
    assert r.kind == "learned" and len(r.points) == 1 and r.points[0].budget is None
    with pytest.raises(ValueError, match="budgets apply to a cascade policy"):
        equal_mac_comparison(art, w, budgets=[0.5], resamples=20, clients=[0])


def test_cli_fit_then_equal_macs(run_dir, tmp_path):
    out = tmp_path / "cas"
    runner = CliRunner()
    res = runner.invoke(app, ["policy", "fit", str(run_dir), "--out", str(out), "--hidden", "8", "--steps", "40",
                              "--members", "2", "--cv-folds", "2", "--decide", "cascade"])
    assert res.exit_code == 0, res.output
    side = json.loads((out / "policy.json").read_text())
    assert (out / "policy.safetensors").is_file() and side["members"] == 2
    assert side["decide"] == "cascade" and side["combine"] == "prior"  # the MLPs read the combined exits
    cv = json.loads((out / "cv.json").read_text())
    # this tiny CNN's first exit costs 15% of full depth: the budgets below it are skipped, said so
    assert cv["folds"] == 2 and list(cv["budgets"]) == ["0.15", "0.2", "0.25", "0.3", "0.5"]
    assert cv["skipped_budgets"] == [0.1]
    assert "2-fold estimate on val" in res.output
    bad = runner.invoke(app, ["policy", "fit", str(run_dir), "--context", "client", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--context must be one of label_prior, none" in bad.output
    bad = runner.invoke(app, ["policy", "fit", str(run_dir), "--combine", "mean", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--combine must be one of prior, plain, none" in bad.output
    bad = runner.invoke(app, ["policy", "fit", str(run_dir), "--decide", "rl", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--decide must be one of threshold, cascade" in bad.output
    res = runner.invoke(app, ["policy", "equal-macs", str(run_dir), "--policy", str(out), "--budgets", "0.4,0.9",
                              "--resamples", "30"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "equal_macs.json").read_text())
    assert [p["budget"] for p in data["points"]] == [0.4, 0.9] and data["resamples"] == 30
    assert (out / "equal_macs.md").read_text().startswith("# cascade exit policy vs thresholds")
    assert (out / "equal_macs.png").stat().st_size > 0
    bad = runner.invoke(app, ["policy", "equal-macs", str(run_dir), "--policy", str(out), "--budgets", "x"])
    assert bad.exit_code == 2 and "--budgets" in bad.output
    for split in ("holdout", "test"):  # 'test' holds the holdout samples: refused as well
        hold = runner.invoke(app, ["policy", "fit", str(run_dir), "--split", split, "--out", str(tmp_path / "h")])
        assert hold.exit_code == 2 and f"not on '{split}'" in hold.output and "overlaps 'holdout'" in hold.output
        assert not (tmp_path / "h").exists()
