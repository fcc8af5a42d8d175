"""Accuracy-vs-MACs evaluation: exact MAC counting, pooling, cost reduction, reports."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.inference import FullDepth, Threshold, predict_batch
from cafe_ray.inference.evaluate import (
    CurvePoint,
    PolicyResult,
    evaluate_policy,
    evaluate_run,
    pool_curves,
    pooled,
    savings,
    sweep,
    threshold_grid,
)
from tests.inference.helpers import HAND_COST, HAND_LABELS, HAND_LOGITS, as_input, sliced_een


def test_predict_batch_counts_cascade_macs_per_sample():
    model = sliced_een(3, 3)
    p = predict_batch(model, as_input(HAND_LOGITS), Threshold(0.6), HAND_COST)
    assert p.exits.tolist() == [0, 1, 2]
    assert p.macs.tolist() == [100 + 10, 100 + 10 + 200 + 20, 100 + 10 + 200 + 20 + 300 + 30]
    assert p.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(("threshold", "acc", "macs", "exits"), [
    (0.6, 2 / 3, (110 + 330 + 660) / 3, (1, 1, 1)),
    (0.4, 1 / 3, (110 + 330 + 110) / 3, (2, 1, 0)),  # sample 2 stops at exit 0 (0.45), wrongly
    (0.95, 2 / 3, 660.0, (0, 0, 3)),
    (0.0, 1 / 3, 110.0, (3, 0, 0)),
])
def test_evaluate_policy_is_exact(threshold, acc, macs, exits):
    r = evaluate_policy(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS, Threshold(threshold), HAND_COST)
    assert r == PolicyResult(pytest.approx(acc), pytest.approx(macs), 3, exits)


def test_batching_does_not_change_the_count():
    x = as_input(HAND_LOGITS.repeat(5, 1, 1))
    y = HAND_LABELS.repeat(5)
    one = evaluate_policy(sliced_een(3, 3), x, y, Threshold(0.6), HAND_COST, batch_size=1000)
    small = evaluate_policy(sliced_een(3, 3), x, y, Threshold(0.6), HAND_COST, batch_size=4)
    assert one == small and one.mean_macs == pytest.approx(1100 / 3)


def test_full_depth_runs_every_stage_and_head():
    r = evaluate_policy(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS, FullDepth(), HAND_COST)
    assert r.mean_macs == 660 and r.exit_counts == (0, 0, 3) and r.accuracy == pytest.approx(2 / 3)


def test_pooled_weights_by_sample_count():
    a = PolicyResult(1.0, 100.0, 1, (1, 0))
    b = PolicyResult(0.25, 300.0, 3, (1, 2))
    assert pooled([a, b]) == PolicyResult(pytest.approx(1.75 / 4), pytest.approx(1000 / 4), 4, (2, 2))


def test_threshold_grid():
    g = threshold_grid(21)
    assert len(g) == 21 and g[0] == 0.0 and g[-1] == 1.0 and 0.6 in g
    assert 0.6 in threshold_grid(4) and len(threshold_grid(4)) == 5
    with pytest.raises(ValueError, match="at least 2 steps"):
        threshold_grid(1)


def test_savings_pick_the_cheapest_point_within_one_accuracy_point():
    def pt(t, acc, macs):
        return CurvePoint(t, PolicyResult(acc, macs, 100, (0,)))

    pts = [pt(0.2, 0.70, 200.0), pt(0.4, 0.795, 400.0), pt(0.6, 0.80, 500.0), pt(0.8, 0.81, 900.0),
           pt(None, 0.805, 1100.0)]
    s = savings(pts, full_macs=1000)
    assert s["within_1pt"].threshold == 0.4 and s["within_1pt"].reduction == pytest.approx(0.6)
    assert s["at_0.6"].mean_macs == 500 and s["at_0.6"].delta_accuracy == pytest.approx(-0.005)
    assert s["at_0.6"].reduction == pytest.approx(0.5)


def test_sweep_ends_with_full_depth():
    pts = sweep(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS, HAND_COST, [0.0, 0.6])
    assert [p.label for p in pts] == ["t=0.00", "t=0.60", "full"]


def test_evaluate_run_matches_per_client_predict_batch(run_dir):
    from cafe_ray.runs import RunArtifacts

    art = RunArtifacts(run_dir)
    ev = evaluate_run(art, split="test", steps=3)
    assert [p.label for p in ev.points] == ["t=0.00", "t=0.50", "t=0.60", "t=1.00", "full"]
    c0 = ev.clients[0]
    x, y = art.client_data(0, "test")
    p = predict_batch(art.client_model(0), x, Threshold(0.6), art.exit_cost)
    r = next(q.result for q in c0.points if q.threshold == 0.6)
    assert r.mean_macs == pytest.approx(float(p.macs.double().mean()))
    assert r.accuracy == pytest.approx(float((p.labels == y).double().mean()))
    n = sum(c.n for c in ev.clients)
    assert ev.full.n == n and ev.full.mean_macs == art.exit_cost.cascade[-1]
    assert ev.full_macs == art.exit_cost.cumulative[-1]
    t0 = ev.points[0].result  # threshold 0: everything leaves at exit 0
    assert t0.mean_macs == art.exit_cost.cascade[0] and t0.exit_counts == (n, 0, 0)


def test_cli_evaluate_two_runs_writes_table_json_and_png(run_dir, run_dir_fedavg, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", str(run_dir), str(run_dir_fedavg), "--out", str(out),
                                   "--steps", "5"])
    assert res.exit_code == 0, res.output
    md = (out / "inference.md").read_text()
    assert "| fedper_ee | test | 6 |" in md and "| fedavg_ee | test | 6 |" in md
    data = json.loads((out / "inference.json").read_text())
    assert [r["algorithm"] for r in data["runs"]] == ["fedper_ee", "fedavg_ee"]
    agg = data["runs"][0]["aggregate"]
    assert {"within_1pt", "at_0.6"} <= set(agg["savings"]) and len(agg["points"]) == 7  # 5 + 0.6 + full
    assert (out / "inference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "inference.md" in res.output.replace("\n", "")


def test_cli_evaluate_rejects_a_bad_split(run_dir):
    res = CliRunner().invoke(app, ["evaluate", str(run_dir), "--split", "nope"])
    assert res.exit_code == 2 and "--split must be one of" in res.output


def test_evaluate_policy_validates_inputs():
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        evaluate_policy(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS[:2], FullDepth(), HAND_COST)


def test_exit_counts_sum_to_n():
    x = as_input(torch.randn(40, 3, 3, generator=torch.Generator().manual_seed(0)) * 3)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    r = evaluate_policy(sliced_een(3, 3), x, y, Threshold(0.7), HAND_COST)
    assert sum(r.exit_counts) == 40
    assert r.mean_macs == pytest.approx(np.dot(r.exit_counts, [110, 330, 660]) / 40)


def test_val_calibrated_threshold_is_chosen_on_validation_and_read_on_test(tmp_path_factory):
    from cafe_ray.runs import RunArtifacts
    from tests.inference.helpers import tiny_run

    rd = tiny_run(tmp_path_factory.getbasetemp() / "inference-runs", "fedper_ee", "data.val_fraction=0.3")
    art = RunArtifacts(rd)
    ev = evaluate_run(art, split="test", steps=5, calibrate_on="val")
    val = evaluate_run(art, split="val", steps=5)
    c = ev.savings["calibrated_1pt"]
    assert c.threshold == val.savings["within_1pt"].threshold  # chosen on validation...
    on_test = next(p.result for p in ev.points if p.threshold == c.threshold)
    assert c.accuracy == on_test.accuracy and c.mean_macs == on_test.mean_macs  # ...read on test
    assert c.delta_accuracy == pytest.approx(on_test.accuracy - ev.full.accuracy)


def test_calibrated_saving_reads_the_calibration_threshold():
    from cafe_ray.inference.evaluate import calibrated_saving

    def pt(t, acc, macs):
        return CurvePoint(t, PolicyResult(acc, macs, 100, (0,)))

    calib = [pt(0.2, 0.70, 200.0), pt(0.4, 0.80, 400.0), pt(None, 0.805, 1000.0)]
    test = [pt(0.2, 0.60, 210.0), pt(0.4, 0.74, 420.0), pt(None, 0.80, 1000.0)]
    s = calibrated_saving(calib, test, full_macs=1000)
    assert s.threshold == 0.4 and s.accuracy == 0.74 and s.delta_accuracy == pytest.approx(-0.06)
    assert s.reduction == pytest.approx(0.58)


def test_calibration_refused_when_val_overlaps_test(run_dir):
    with pytest.raises(ValueError, match="overlap"):
        evaluate_run(run_dir, split="test", steps=3, calibrate_on="val")
    ev = evaluate_run(run_dir, split="holdout", steps=3, calibrate_on="val")  # halves of test: disjoint
    assert "calibrated_1pt" in ev.savings


def test_accuracy_drop_bound_by_hand():
    from statistics import NormalDist

    from cafe_ray.inference.evaluate import accuracy_drop_bound

    full = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    here = np.array([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)  # d = 0,1,0,0,-1,0,1,0,0,0
    d = np.array([0, 1, 0, 0, -1, 0, 1, 0, 0, 0], dtype=float)
    want = d.mean() + NormalDist().inv_cdf(0.9) * d.std(ddof=1) / np.sqrt(10)
    assert accuracy_drop_bound(full, here, 0.9) == pytest.approx(want)
    assert accuracy_drop_bound(full, full, 0.9) == 0.0  # no answer changed: no doubt either
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        accuracy_drop_bound(full, here, 1.0)
    with pytest.raises(ValueError, match="same, non-empty samples"):
        accuracy_drop_bound(full, here[:5], 0.9)


def test_a_confidence_bound_skips_a_point_whose_small_drop_is_noise():
    """Same point estimates, two ways to get there: a cheap threshold that changes many answers
    (wins and losses cancel) qualifies on the point estimate but not under a 90% bound."""

    def pt(t, macs, correct):
        c = np.array(correct, dtype=bool)
        return CurvePoint(t, PolicyResult(float(c.mean()), macs, c.size, (0,)), c)

    n = 1000
    full = np.ones(n, dtype=bool)
    full[:100] = False  # 90% at full depth
    noisy = full.copy()
    noisy[:100] = True  # wins 100 answers ...
    noisy[100:205] = False  # ... and loses 105: -0.5 points, 205 answers changed
    steady = full.copy()
    steady[100:105] = False  # -0.5 points, 5 answers changed
    pts = [pt(0.2, 300.0, noisy), pt(0.6, 500.0, steady), pt(None, 1000.0, full)]
    assert savings(pts, full_macs=1000)["within_1pt"].threshold == 0.2
    assert savings(pts, full_macs=1000, confidence=0.9)["within_1pt"].threshold == 0.6
    with pytest.raises(ValueError, match="per-sample results"):
        savings([CurvePoint(p.threshold, p.result) for p in pts], full_macs=1000, confidence=0.9)


def test_pooled_curves_keep_per_sample_results_in_client_order():
    x = as_input(torch.randn(30, 3, 3, generator=torch.Generator().manual_seed(0)) * 3)
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(1))
    a = sweep(sliced_een(3, 3), x[:10], y[:10], HAND_COST, [0.0, 0.6])
    b = sweep(sliced_een(3, 3), x[10:], y[10:], HAND_COST, [0.0, 0.6])
    whole = sweep(sliced_een(3, 3), x, y, HAND_COST, [0.0, 0.6])
    for p, w in zip(pool_curves([a, b]), whole, strict=True):
        assert np.array_equal(p.correct, w.correct) and p.result.accuracy == pytest.approx(w.correct.mean())


def test_cli_evaluate_with_a_confidence_bound(tmp_path_factory, tmp_path):
    from tests.inference.helpers import tiny_run

    rd = tiny_run(tmp_path_factory.getbasetemp() / "inference-runs", "fedper_ee", "data.val_fraction=0.3")
    res = CliRunner().invoke(app, ["evaluate", str(rd), "--out", str(tmp_path), "--steps", "5",
                                   "--calibrate-confidence", "0.9"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "inference.json").read_text())
    assert data["runs"][0]["calibrate_confidence"] == 0.9
    assert "calibrated_1pt" in data["runs"][0]["aggregate"]["savings"]
    assert "one-sided 90% bound" in (tmp_path / "inference.md").read_text()
    bad = CliRunner().invoke(app, ["evaluate", str(rd), "--calibrate-confidence", "1.5"])
    assert bad.exit_code == 2 and "--calibrate-confidence must be in (0, 1)" in bad.output
