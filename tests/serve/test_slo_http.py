"""Latency-SLO control and /v1/stats over real HTTP, and the autoscaling config."""

from __future__ import annotations

import numpy as np
import pytest

from cafe_ray.serve.slo import curve_point, ladder_curve, pooled_ladder, threshold_curve
from tests.serve.conftest import SLO_DROP_POINTS
from tests.serve.test_strict_api import ONE, assert_error_shape

DROP = SLO_DROP_POINTS / 100


def _val_curve(service, cid: int, drop: float = DROP):
    """The client's SLO curve as the server builds it: on the ladder pooled from every client's val
    scores (``slo_curve: pooled``, the default) or on the client's own val front."""
    model = service.load_model(cid)
    mp, ok = service.val_scores(cid, model)
    cascade = service.cost.cascade
    if service.cfg.slo_curve == "pooled":
        pooled = [service.val_scores(c, service.load_model(c)) for c in service.client_ids]
        points = ladder_curve(mp, ok, cascade, pooled_ladder(pooled, cascade, max_accuracy_drop=drop), drop)
    else:
        points = threshold_curve(mp, ok, cascade, max_accuracy_drop=drop)
    return points, curve_point(mp, ok, cascade, None)


def test_an_unreachable_target_moves_to_the_cheapest_point_above_the_floor(http, service, serve_artifacts):
    """A 0.001 ms p99 target cannot be met: after enough requests the controller sits at the
    cheapest point of the client's val curve above the floor, and no further."""
    cid = 4
    x, _ = serve_artifacts.client_data(cid)
    body = {"inputs": x[:8].tolist(), "latency_slo_ms": 0.001}
    seen = []
    for _ in range(60):
        r = http.post(f"/v1/clients/{cid}/predict", json=body)
        assert r.status_code == 200, r.text
        seen.append(r.json()["policy"])
    points, full = _val_curve(service, cid)
    assert len(points) >= 2
    assert seen[0]["operating_point"] == 0 and seen[0]["latency_slo_ms"] == 0.001
    assert seen[-1]["operating_point"] == len(points) - 1
    assert all(p["val_accuracy"] >= full.accuracy - DROP - 1e-9 for p in seen)
    last = points[-1]
    assert seen[-1].get("threshold") == last.threshold and seen[-1]["val_accuracy"] == pytest.approx(last.accuracy)
    stats = http.get("/v1/stats").json()
    row = next(c for c in stats["clients"] if c["client_id"] == cid)
    assert row["requests"] >= 60 and row["samples"] >= 480
    (op,) = row["operating_points"]
    assert op["latency_slo_ms"] == 0.001 and op["index"] == len(points) - 1 and op["moves"] >= 1
    assert op["macs_per_sample"] == pytest.approx(last.macs) and op["val_accuracy"] == pytest.approx(last.accuracy)
    assert stats["stage_ms_per_sample"] and len(stats["stage_ms_per_sample"]) == serve_artifacts.exit_cost.num_exits


def test_a_generous_target_stays_at_full_accuracy(http, service, serve_artifacts):
    cid = 5
    x, _ = serve_artifacts.client_data(cid)
    for _ in range(30):
        r = http.post(f"/v1/clients/{cid}/predict", json={"inputs": x[:4].tolist(), "latency_slo_ms": 60_000})
        assert r.status_code == 200 and r.json()["policy"]["operating_point"] == 0


def test_stats_report_counts_percentiles_macs_and_implied_accuracy(http, service, serve_artifacts):
    cid = 2
    before = next((c for c in http.get("/v1/stats").json()["clients"] if c["client_id"] == cid), {"requests": 0})
    x, _ = serve_artifacts.client_data(cid)
    for _ in range(5):
        assert http.post(f"/v1/clients/{cid}/predict", json={"inputs": x[:3].tolist(), "policy": "full"}).status_code \
            == 200
    stats = http.get("/v1/stats").json()
    row = next(c for c in stats["clients"] if c["client_id"] == cid)
    assert row["requests"] == before["requests"] + 5
    assert row["p50_ms"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["queue_p99_ms"] >= 0
    _, full = _val_curve(service, cid)
    if before["requests"] == 0:  # only full-depth requests so far: their MACs and val accuracy exactly
        assert row["mean_macs"] == serve_artifacts.exit_cost.cascade[-1]
        assert row["implied_accuracy"] == pytest.approx(full.accuracy)
    overall = stats["overall"]
    assert overall["requests"] >= sum(c["requests"] for c in stats["clients"]) and overall["p99_ms"] > 0
    assert stats["uptime_s"] > 0 and stats["replica"]


@pytest.mark.parametrize("body", [
    {"inputs": ONE, "latency_slo_ms": 50, "policy": "full"},
    {"inputs": ONE, "latency_slo_ms": 50, "threshold": 0.5},
    {"inputs": ONE, "latency_slo_ms": 0},
    {"inputs": ONE, "latency_slo_ms": "50"},
])
def test_latency_slo_with_a_fixed_policy_or_a_bad_value_is_422(http, body):
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json=body), 422)
    assert detail[0]["loc"] == ["body", "latency_slo_ms"]


def test_the_server_default_slo_applies_to_requests_that_name_no_policy(serve_run_dir):
    """In process (no Ray): a server started with --latency-slo-ms controls only requests that
    name no policy; the others run as they ask."""
    from cafe_ray.serve.config import ServeConfig
    from cafe_ray.serve.service import ModelService

    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), latency_slo_ms=0.001,
                                   max_accuracy_drop=SLO_DROP_POINTS))
    assert len(_val_curve(svc, 0)[0]) >= 2
    from cafe_ray.serve.schemas import PredictRequest

    x = np.zeros((2, 1, 8, 8), dtype=np.float32).tolist()
    model = svc.load_model(0)
    for _ in range(40):  # what a replica does per request, with the model cached
        job = svc.job(0, PredictRequest(inputs=x), model)
        (out,) = svc.run_jobs([job], {0: model})
        svc.finish(job, out, 0.01)
    assert job.described["latency_slo_ms"] == 0.001 and job.described["operating_point"] > 0
    assert svc.predict(0, {"inputs": x, "policy": "full"}).policy == {"policy": "full"}
    assert svc.predict(0, {"inputs": x, "policy": "threshold"}).policy == {"policy": "threshold", "threshold": 0.6}
    stats = svc.stats_snapshot("local")
    assert stats.clients[0].operating_points[0].points == len(_val_curve(svc, 0)[0])


def test_the_slo_curve_follows_the_pooled_ladder_or_the_clients_own_front(serve_run_dir):
    """In process: by default every client's controller walks the thresholds pooled from all
    clients' val scores (so clients on the same rung run the same threshold); ``slo_curve:
    client`` gives each client its own val front. Both start at full depth and keep the floor."""
    from cafe_ray.serve.config import ServeConfig
    from cafe_ray.serve.service import ModelService

    curves = {}
    for mode in ("pooled", "client"):
        svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), max_accuracy_drop=SLO_DROP_POINTS, slo_curve=mode))
        curves[mode] = {c: svc.controller(c, 50.0, svc.load_model(c)).points for c in svc.client_ids}
        assert curves[mode] == {c: _val_curve(svc, c)[0] for c in svc.client_ids}
        if mode == "pooled":
            ladder = svc.ladder()
            assert ladder[0] is None and len(ladder) >= 2
    for mode, by_client in curves.items():
        for c, pts in by_client.items():
            assert pts[0].threshold is None and pts[0].accuracy - pts[-1].accuracy <= DROP + 1e-9, (mode, c)
    rungs = [{p.threshold for p in pts[1:]} for pts in curves["pooled"].values()]
    assert set().union(*rungs) <= set(ladder[1:])  # every client's thresholds come from the one ladder
    assert curves["pooled"] != curves["client"]
    with pytest.raises(ValueError, match="slo_curve"):
        ServeConfig(run_dir=str(serve_run_dir), slo_curve="mine")


def test_every_controller_of_a_target_learns_from_all_clients_requests(serve_run_dir):
    """In process: the clients of a replica share its CPU, so client 1's requests reach client 2's
    controller of the same target (and not a controller of another target): under load each
    controller sees the whole replica's latency, not a trickle of its own client's."""
    from cafe_ray.serve.config import ServeConfig
    from cafe_ray.serve.schemas import PredictRequest
    from cafe_ray.serve.service import ModelService

    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), max_accuracy_drop=SLO_DROP_POINTS))
    models = {c: svc.load_model(c) for c in (1, 2)}
    other = svc.controller(2, 50.0, models[2])
    elsewhere = svc.controller(2, 80.0, models[2])
    x = np.zeros((3, 1, 8, 8), dtype=np.float32).tolist()
    for _ in range(5):
        job = svc.job(1, PredictRequest(inputs=x, latency_slo_ms=50), models[1])
        (out,) = svc.run_jobs([job], models)
        svc.finish(job, out, 0.01)
    assert len(other._lat) == 5 and len(svc.cached_controller(1, 50.0)._lat) == 5
    assert len(elsewhere._lat) == 0


def test_autoscale_is_serves_autoscaling_on_ongoing_requests(serve_run_dir):
    from cafe_ray.serve.app import build_app
    from cafe_ray.serve.config import ServeConfig

    cfg = ServeConfig(run_dir=str(serve_run_dir), autoscale=(1, 3), target_ongoing_requests=4)
    dc = build_app(cfg)._bound_deployment._deployment_config
    a = dc.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 3, 4)
    assert dc.graceful_shutdown_timeout_s <= 2
    with pytest.raises(ValueError, match="MIN:MAX"):
        ServeConfig(run_dir=str(serve_run_dir), autoscale=(3, 1))
