"""The serving benchmark's bookkeeping (the benchmark itself is `cafe-ray bench serve`, not a test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cafe_ray.bench.serve import ServeBench, _merge, markdown


def _part(lat, status, labels, exits, macs):
    return {"wall_s": 2.0, "latency_s": np.asarray(lat), "status": np.asarray(status), "labels": labels,
            "exits": exits, "macs": macs}


def test_merge_counts_errors_accuracy_exits_and_percentiles():
    y = np.array([[1, 2], [3, 4]])
    part = _part([0.010, 0.030], [200, 500], [[1, 0], []], [[0, 2], []], [[10, 30], []])
    r = _merge("x", [part, part], y, num_exits=3)
    assert (r.requests, r.errors, r.samples) == (4, 2, 4)
    assert r.accuracy == 0.5 and r.mean_macs == 20 and r.exit_share == (0.5, 0.0, 0.5)
    assert r.throughput == 1.0 and r.mean_ms == pytest.approx(20) and r.pct(50) == pytest.approx(20)


def test_latency_cut_and_report():
    y = np.array([[0]])
    full = _merge("full", [_part([0.04], [200], [[0]], [[2]], [[90]])], y, 3)
    dyn = _merge("t", [_part([0.01], [200], [[1]], [[0]], [[10]])], y, 3)
    b = ServeBench("run", 0.9, 8, 1, [0], full, dyn, 90)
    assert b.latency_cut == pytest.approx(0.75) and b.accuracy_delta_pts == pytest.approx(-100)
    assert "mean latency cut by the threshold policy: 75.0%" in markdown(b)
    assert b.to_json()["threshold_policy"]["mean_macs"] == 10


def test_workload_bodies_in_every_format_carry_the_same_samples():
    import base64
    import io

    from cafe_ray.bench.serve import Workload, query_string

    rng = np.random.default_rng(0)
    w = Workload(np.array([3, 4, 3]), rng.random((3, 2, 1, 2, 2), dtype=np.float32), np.zeros((3, 2), int))
    npy = [np.load(io.BytesIO(b)) for b in w.bodies({"policy": "full"}, fmt="npy")]
    b64 = [json.loads(b) for b in w.bodies({"policy": "full"}, fmt="b64")]
    js = [json.loads(b) for b in w.bodies({"policy": "full"})]
    for i in range(3):
        np.testing.assert_array_equal(npy[i], w.x[i])
        raw = np.frombuffer(base64.b64decode(b64[i]["inputs_b64"]), "<f4").reshape(w.x[i].shape)
        np.testing.assert_array_equal(raw, w.x[i])
        np.testing.assert_allclose(js[i]["inputs"], w.x[i], atol=1e-5)
        assert b64[i]["policy"] == js[i]["policy"] == "full"
    rep = w.repeated()
    np.testing.assert_array_equal(rep.x[2], w.x[0])  # client 3's requests all carry its first body
    assert query_string({"policy": "threshold", "threshold": 0.6, "return_probs": False}) == \
        "?policy=threshold&threshold=0.6&return_probs=false"


def test_ramp_table_plot_and_equal_macs_accuracy(tmp_path):
    from cafe_ray.bench.ramp import Phase, Ramp, _phase, markdown, plot

    y = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    res = {"wall_s": 2.0, "latency_s": np.array([9.0, 0.010, 0.020, 0.030]), "status": np.array([200, 200, 500, 200]),
           "labels": [[0, 0], [3, 0], [], [7, 8]], "exits": [[0, 0]] * 4, "macs": [[10, 10], [10, 30], [], [20, 20]]}
    from cafe_ray.bench.serve import Workload

    p = _phase("slo", 4, res, Workload(np.zeros(4, int), np.zeros((4, 2, 1)), y), settle=0.25, uptime="1.0")
    assert (p.requests, p.errors) == (3, 1)  # the first request (the transient) left out
    assert p.accuracy == 0.75 and p.mean_macs == 20 and p.p99_ms < 31 and p.throughput == 2.0

    def ph(policy, c, p99, acc, macs):
        return Phase(policy, c, 10, 0, p99 / 2, p99, 5.0, acc, macs, "0.5 0.5 0.5")

    phases = [ph("full", 1, 10, 0.92, 100), ph("threshold", 1, 6, 0.91, 30), ph("slo", 1, 9, 0.92, 90),
              ph("full", 8, 80, 0.92, 100), ph("threshold", 8, 40, 0.91, 30), ph("slo", 8, 14, 0.915, 50),
              ph("full", 1, 10, 0.92, 100), ph("threshold", 1, 6, 0.91, 30), ph("slo", 1, 9, 0.92, 100)]
    r = Ramp("run", 15.0, 10.0, 0.8, 64, phases, [(100, 0.92), (30, 0.91), (10, 0.8)])
    assert r.steps == [1, 8, 1] and r.at("slo", 1).p99_ms == 14
    assert r.accuracy_at_macs(65) == pytest.approx(0.915)
    table = markdown(r)
    assert "| 8 | 80.0 / 92.00% |" in table and "| no / yes |" in table and "1 (load drops)" in table
    out = plot(r, tmp_path / "ramp.png")
    assert out.stat().st_size > 10_000
    assert r.to_json()["phases"][5]["p99_ms"] == 14


def test_the_load_is_dealt_over_several_urls(served, serve_run_dir, serve_artifacts):
    """The ramp's and the bench's load generator spreads its closed-loop workers over every URL it
    is given (the replicas' own ports under direct ingress): here the tests' application and a
    second one on the same proxy, each counting what it answered in /v1/stats."""
    import httpx
    from ray import serve

    from cafe_ray.bench.serve import _load
    from cafe_ray.serve.app import start
    from cafe_ray.serve.config import ServeConfig

    extra = ServeConfig(run_dir=str(serve_run_dir), port=served[0].port, replica_cpus=0, app_name="cafe-ray-deal",
                        route_prefix="/deal")
    start(extra)
    urls = [served[0].url, extra.url]
    try:
        def answered() -> list[int]:
            return [httpx.get(f"{u}/v1/stats", timeout=30).json()["overall"]["requests"] for u in urls]

        before = answered()
        x, _ = serve_artifacts.client_data(1)
        body = json.dumps({"inputs": x[:2].tolist(), "policy": "full"}).encode()
        out = _load(urls, [1] * 24, [body] * 24, concurrency=4, timeout_s=60)
        assert out["status"] == [200] * 24 and all(len(lab) == 2 for lab in out["labels"])
        took = [a - b for a, b in zip(answered(), before, strict=True)]
        assert sum(took) == 24 and min(took) >= 6  # two workers per URL: each took a share
    finally:
        serve.delete(extra.app_name)
