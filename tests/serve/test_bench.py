"""The serving benchmark's bookkeeping (the benchmark itself is `cafe-ray bench serve`, not a test)."""

from __future__ import annotations

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
    import json

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
