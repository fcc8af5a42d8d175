"""The latency-SLO controller on synthetic curves and latency traces (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from cafe_ray.serve.slo import (
    OperatingPoint,
    ServiceModel,
    SloController,
    SloSettings,
    curve_point,
    ladder_curve,
    pooled_ladder,
    threshold_curve,
)

CASCADE = [100, 400, 1000]


def scores(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three exits, deeper ones more confident and more often right; confident answers are right
    more often (as a real early-exit model's are)."""
    rng = np.random.default_rng(seed)
    conf = np.clip(rng.beta([2, 3, 5], [2, 1.5, 1], size=(n, 3)), 0.1, 1.0)
    correct = rng.random((n, 3)) < 0.45 + 0.5 * conf
    return conf, correct


def test_curve_is_a_pareto_front_above_the_floor():
    conf, correct = scores()
    full_acc = correct[:, -1].mean()
    for drop in (0.0, 0.01, 0.05, 1.0):
        pts = threshold_curve(conf, correct, CASCADE, max_accuracy_drop=drop)
        assert pts[0].threshold is None and pts[0].accuracy == pytest.approx(full_acc)  # full depth first
        assert all(p.accuracy >= full_acc - drop - 1e-12 for p in pts)
        assert all(a.macs > b.macs for a, b in zip(pts, pts[1:], strict=False))
        assert all(a.accuracy > b.accuracy for a, b in zip(pts[1:], pts[2:], strict=False))
        for p in pts:
            assert p.reach[0] == 1.0 and list(p.reach) == sorted(p.reach, reverse=True)
            assert p.macs == pytest.approx(sum(CASCADE[k] * (p.reach[k] - (p.reach[k + 1] if k < 2 else 0))
                                               for k in range(3)))
    assert len(threshold_curve(conf, correct, CASCADE, max_accuracy_drop=1.0)) > \
        len(threshold_curve(conf, correct, CASCADE, max_accuracy_drop=0.01))
    full = threshold_curve(conf, correct, CASCADE, thresholds=())
    assert len(full) == 1 and full[0].threshold is None and full[0].macs == 1000 and full[0].reach == (1, 1, 1)
    with pytest.raises(ValueError, match="same"):
        threshold_curve(conf[:, :2], correct, CASCADE)


def test_full_depth_stays_first_where_a_threshold_looks_as_accurate_on_val():
    """On a small val split a cheap threshold can score as well as full depth; the curve still
    starts at full depth, the point a controller returns to when the load allows."""
    conf = np.tile([0.97, 0.98, 0.99], (50, 1))
    correct = np.ones((50, 3), dtype=bool)  # every exit right: thresholds <= 0.97 are as accurate, cheaper
    pts = threshold_curve(conf, correct, CASCADE, max_accuracy_drop=0.0)
    assert pts[0].threshold is None and pts[0].macs == CASCADE[-1]
    assert len(pts) == 2 and pts[1].threshold is not None and pts[1].macs == CASCADE[0]
    assert pts[1].accuracy == pts[0].accuracy == 1.0


def test_pooled_ladder_is_the_front_of_all_clients_scores_together():
    parts = [scores(300, seed) for seed in range(4)]
    ladder = pooled_ladder(parts, CASCADE, max_accuracy_drop=0.05)
    conf = np.concatenate([p[0] for p in parts])
    correct = np.concatenate([p[1] for p in parts])
    assert ladder == [p.threshold for p in threshold_curve(conf, correct, CASCADE, max_accuracy_drop=0.05)]
    assert ladder[0] is None and len(ladder) >= 3
    with pytest.raises(ValueError, match="at least one client"):
        pooled_ladder([], CASCADE)


def test_clients_on_the_same_rung_run_the_pooled_threshold():
    """Where no client's floor ends its ladder, every client on rung j runs the ladder's threshold j:
    their samples together cost and score exactly what that one fixed threshold does on the pool."""
    parts = [scores(300, seed) for seed in range(4)]
    ladder = pooled_ladder(parts, CASCADE, max_accuracy_drop=1.0)
    curves = [ladder_curve(c, ok, CASCADE, ladder, max_accuracy_drop=1.0) for c, ok in parts]
    conf = np.concatenate([p[0] for p in parts])
    correct = np.concatenate([p[1] for p in parts])
    for t in ladder:
        fixed = curve_point(conf, correct, CASCADE, t)
        pts = [curve_point(c, ok, CASCADE, t) for c, ok in parts]
        assert np.mean([p.macs for p in pts]) == pytest.approx(fixed.macs)
        assert np.mean([p.accuracy for p in pts]) == pytest.approx(fixed.accuracy)
    for pts in curves:
        assert pts[0].threshold is None
        assert {p.threshold for p in pts[1:]} <= set(ladder[1:])
        assert all(a.macs > b.macs for a, b in zip(pts, pts[1:], strict=False))  # no rung that changes nothing


def test_a_clients_floor_ends_its_ladder_at_the_first_rung_below_it():
    """Rung 0.9 is clearly below this client's floor (both early exits it takes are wrong), rung 0.5
    is above it again (the first exit is right where the second is wrong): the ladder ends at 0.9.
    A drop within a few standard errors of the floor does not end it."""
    conf = np.array([[0.95, 0.99, 0.99]] * 10 + [[0.6, 0.92, 0.99]] * 10)
    correct = np.ones((20, 3), dtype=bool)
    correct[:10, 0] = False
    correct[10:, 1] = False
    assert curve_point(conf, correct, CASCADE, 0.9).accuracy == 0.0
    assert curve_point(conf, correct, CASCADE, 0.5).accuracy == 0.5
    pts = ladder_curve(conf, correct, CASCADE, [None, 0.995, 0.9, 0.5], max_accuracy_drop=0.6)
    assert [p.threshold for p in pts] == [None]  # 0.995 changes nothing (same MACs), 0.9 is below the floor
    pts = ladder_curve(conf, correct, CASCADE, [None, 0.995, 0.9, 0.5], max_accuracy_drop=1.0)
    assert [p.threshold for p in pts] == [None, 0.9, 0.5]
    # one sample of 100 wrong at a rung is within the noise of the split: a 0-point floor keeps it
    sure = np.tile([0.95, 0.99, 0.99], (100, 1))
    few = np.ones((100, 3), dtype=bool)
    few[0, 0] = False
    assert [p.threshold for p in ladder_curve(sure, few, CASCADE, [None, 0.9], max_accuracy_drop=0.0)] == [None, 0.9]
    assert ladder_curve(sure, few, CASCADE, [None, 0.9], max_accuracy_drop=0.0, margin_se=0.0) == \
        ladder_curve(sure, few, CASCADE, [None])
    with pytest.raises(ValueError, match="full depth"):
        ladder_curve(conf, correct, CASCADE, [0.5])
    with pytest.raises(ValueError, match="only at its top"):
        ladder_curve(conf, correct, CASCADE, [None, 0.5, None], max_accuracy_drop=1.0)


def test_service_model_learns_per_exit_time_that_macs_do_not_show():
    true_a, true_c = 0.002, np.array([4e-5, 2e-5, 6e-5])  # stage 1 memory-bound: costly for its MACs
    model = ServiceModel([100, 300, 600], ridge=1e-4)  # MACs as the prior: wrong ratios, learned away
    rng = np.random.default_rng(1)
    for _ in range(300):
        n0 = rng.integers(16, 512)
        ran = [n0, rng.integers(0, n0 + 1), 0]
        ran[2] = rng.integers(0, ran[1] + 1)
        model.observe(ran, true_a + float(true_c @ ran) + rng.normal(0, 1e-5))
    np.testing.assert_allclose(model.coef[1:], true_c, rtol=0.05)
    assert model.coef[0] == pytest.approx(true_a, rel=0.1)
    p = OperatingPoint(0.5, 0.9, 300.0, (1.0, 0.5, 0.25))
    assert model.per_sample(p) == pytest.approx(float(true_c @ [1, 0.5, 0.25]), rel=0.05)


def test_service_model_starts_from_its_prior_rescaled_to_the_calls():
    model = ServiceModel([1.0, 3.0, 6.0])
    assert model.coef[1:] == pytest.approx([1, 3, 6])
    model.observe([64, 64, 64], 0.01)
    c = model.coef[1:]
    assert c[1] / c[0] == pytest.approx(3, rel=0.05) and c[2] / c[0] == pytest.approx(6, rel=0.05)
    assert model.call(OperatingPoint(None, 1, 1, (1, 1, 1)), 64) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="non-negative"):
        ServiceModel([1.0, -1.0])


def simulate(points, target_s, load, samples=64, seed=0):
    """A replica serving ``load(t)`` clients in a closed loop, one call at a time: a request's
    service time follows the current point's per-exit cost, its queueing delay is the calls of
    the requests ahead of it. Returns [(time, in flight, point index, latency)]."""
    true_a, true_c = 0.002, np.array([6e-5, 3e-5, 5e-5])
    service = ServiceModel(true_c * [1.2, 0.8, 1.1])  # stages timed once, with an error
    ctl = SloController(points, target_s, service, SloSettings())
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    while t < load.end:
        n = load(t)
        p = ctl.point
        s = true_a + samples * float(true_c @ np.asarray(p.reach)) * (1 + 0.05 * rng.standard_normal())
        service.observe([samples * r for r in p.reach], s)
        queue = (n - 1) * s
        ctl.observe(t + s, queue + s, queue, samples)
        ctl.update(t + s)
        out.append((t, n, ctl.index, queue + s))
        t += s
    return out, ctl


class Ramp:
    """In flight 1, then 2 from 5 s to 15 s, then 1 again until 25 s."""

    end = 25.0

    def __call__(self, t: float) -> int:
        return 2 if 5 <= t < 15 else 1


def test_controller_holds_the_target_under_load_and_returns_to_full_depth():
    conf, correct = scores()
    points = threshold_curve(conf, correct, CASCADE, max_accuracy_drop=0.05)
    assert len(points) >= 4
    full_s = 0.002 + 64 * (6e-5 + 3e-5 + 5e-5)  # one request at full depth: 10.96 ms
    target = 1.5 * full_s
    trace, ctl = simulate(points, target, Ramp())
    floor = correct[:, -1].mean() - 0.05  # full depth's accuracy - the allowed drop
    assert all(points[i].accuracy >= floor for _, _, i, _ in trace)  # never below the floor
    quiet = [lat for t, n, i, lat in trace if t < 5]
    assert all(i == 0 for t, _, i, _ in trace if t < 5) and max(quiet) < target
    loaded = [(i, lat) for t, n, i, lat in trace if 8 <= t < 15]  # after converging
    assert loaded and min(i for i, _ in loaded) > 0
    assert np.percentile([lat for _, lat in loaded], 99) <= target  # full depth: 2 x 11 ms
    assert all(i == 0 for t, _, i, _ in trace if t >= 20)  # back at full depth once load dropped
    again, _ = simulate(points, target, Ramp())
    assert [r[2] for r in again] == [r[2] for r in trace]  # deterministic


def test_controller_goes_no_further_than_the_floor_when_the_target_is_out_of_reach():
    conf, correct = scores()
    points = threshold_curve(conf, correct, CASCADE, max_accuracy_drop=0.01)
    trace, ctl = simulate(points, 0.001, Ramp())  # 1 ms: not even exit 1 for everyone makes it
    assert ctl.index == len(points) - 1
    assert all(points[i].accuracy >= correct[:, -1].mean() - 0.01 for _, _, i, _ in trace)


def test_controller_validates_its_inputs_and_waits_for_enough_requests():
    with pytest.raises(ValueError, match="at least one"):
        SloController([], 0.1, ServiceModel([1.0, 1.0, 1.0]))
    pts = [OperatingPoint(None, 0.9, 1000, (1, 1, 1)), OperatingPoint(0.5, 0.85, 200, (1, 0.2, 0.1))]
    with pytest.raises(ValueError, match="> 0"):
        SloController(pts, 0, ServiceModel([1.0, 1.0, 1.0]))
    ctl = SloController(pts, 0.01, ServiceModel([1.0, 1.0, 1.0]), SloSettings(min_requests=5))
    for i in range(4):
        ctl.observe(i * 0.01, 1.0, 0.9, 64)
    assert ctl.update(0.05) == 0  # 4 requests: too few to decide
    ctl.observe(0.05, 1.0, 0.9, 64)
    assert ctl.update(0.06) == 1 and ctl.moves == 1
    ctl.observe(0.07, 1.0, 0.9, 64)
    assert ctl.update(0.1) == 1 and ctl._next == pytest.approx(0.31)  # one decision per interval_s


def test_an_idle_client_returns_to_full_depth():
    pts = [OperatingPoint(None, 0.9, 1000, (1, 1, 1)), OperatingPoint(0.5, 0.85, 200, (1, 0.2, 0.1))]
    ctl = SloController(pts, 0.01, ServiceModel([1.0, 1.0, 1.0]), SloSettings(min_requests=5))
    for i in range(5):
        ctl.observe(i * 0.01, 1.0, 0.9, 64)
    assert ctl.update(0.05) == 1
    assert ctl.update(3.0) == 1  # no request in the window: the move up waits hold_s
    assert ctl.update(4.0) == 0


def test_under_light_load_it_moves_back_up_to_the_point_predicted_to_fit():
    """Two requests per window (fewer than min_requests): no move down, and back to full depth
    once the slowest of them predicts full depth under the aim."""
    pts = [OperatingPoint(None, 0.9, 1000, (1, 1, 1)), OperatingPoint(0.7, 0.88, 600, (1, 0.6, 0.3)),
           OperatingPoint(0.5, 0.85, 200, (1, 0.2, 0.1))]
    service = ServiceModel([1e-4, 1e-4, 1e-4])  # 64 samples at full depth: 19.2 ms, at the cheapest 8.3 ms
    ctl = SloController(pts, 0.05, service, SloSettings(min_requests=8))
    ctl.index = 2
    t = 0.0
    while t < 3.0:
        ctl.observe(t, 0.0083 + 0.001, 0.0, 64)  # 1 ms outside the model call
        ctl.update(t)
        t += 1.0
    assert ctl.index == 0  # 19.2 + 1 ms predicted < 0.8 x 50 ms
    slow = SloController(pts, 0.018, service, SloSettings(min_requests=8))
    slow.index = 2
    for i in range(6):
        slow.observe(float(i), 0.0093, 0.0, 64)
        slow.update(float(i))
    assert slow.index == 1  # full depth (20.2 ms) would not fit 0.8 x 18 ms; the middle point (13.2) does
