"""Ray Serve for real: HTTP on a free loopback port, and the deployment handle."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from cafe_ray.inference import FullDepth, Threshold, predict_batch
from cafe_ray.serve.core import InvalidInput, RequestError, UnknownClient
from cafe_ray.serve.schemas import PredictResponse
from tests.serve.conftest import MAX_BATCH


@pytest.fixture(scope="module")
def direct(serve_artifacts):
    """Client models run in this process, for reference answers."""
    return {c: serve_artifacts.client_model(c) for c in serve_artifacts.client_ids}


def _post(http, cid, **body):
    return http.post(f"/v1/clients/{cid}/predict", json=body)


def test_health_clients_and_openapi(http, serve_artifacts):
    h = http.get("/healthz").json()
    assert h["status"] == "ok" and h["clients"] == 6 and h["algorithm"] == "fedper_ee"
    clients = http.get("/v1/clients").json()
    assert [c["client_id"] for c in clients["clients"]] == serve_artifacts.client_ids
    detail = http.get("/v1/clients/4").json()
    assert detail["input_shape"] == [1, 8, 8]
    assert [e["macs"] for e in detail["exits"]] == serve_artifacts.exit_cost.cascade
    assert [e["test_accuracy"] for e in detail["exits"]] == serve_artifacts.last_eval()[4]
    schema = http.get("/openapi.json").json()
    assert "/v1/clients/{client_id}/predict" in schema["paths"]
    assert {"inputs", "policy", "threshold", "mac_budget", "return_probs"} <= set(
        schema["components"]["schemas"]["PredictRequest"]["properties"])
    assert "threshold" in http.get("/v1/policies").json()["available"]


@pytest.mark.parametrize("cid", [0, 3])
def test_http_predictions_match_the_model_run_directly(http, serve_artifacts, direct, cid):
    x, _ = serve_artifacts.client_data(cid)
    x = x[:MAX_BATCH]
    r = _post(http, cid, inputs=x.tolist(), threshold=0.15, return_probs=True)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    want = predict_batch(direct[cid], x, Threshold(0.15), serve_artifacts.exit_cost)
    assert [p["label"] for p in got] == want.labels.tolist()
    assert [p["exit_index"] for p in got] == want.exits.tolist()
    assert [p["exit"] for p in got] == (want.exits + 1).tolist()
    assert [p["macs"] for p in got] == want.macs.tolist()
    assert torch.tensor([p["probs"] for p in got]) == pytest.approx(want.probs, abs=1e-5)


def test_personal_models_differ_between_clients(http, serve_artifacts):
    x, _ = serve_artifacts.client_data(0)
    body = {"inputs": x[:4].tolist(), "policy": "full", "return_probs": True}
    p0 = torch.tensor([p["probs"] for p in _post(http, 0, **body).json()["predictions"]])
    p1 = torch.tensor([p["probs"] for p in _post(http, 1, **body).json()["predictions"]])
    assert (p0 - p1).abs().max() > 1e-3


def test_exits_and_macs_follow_the_policy(http, serve_artifacts):
    cascade = serve_artifacts.exit_cost.cascade
    x, _ = serve_artifacts.client_data(5)
    first = _post(http, 5, inputs=x[:5].tolist(), policy="threshold", threshold=0.0).json()
    assert {(p["exit"], p["exit_index"], p["macs"]) for p in first["predictions"]} == {(1, 0, cascade[0])}
    assert first["mean_macs"] == cascade[0]
    full = _post(http, 5, inputs=x[:5].tolist(), policy="full").json()
    assert {(p["exit"], p["exit_index"], p["macs"]) for p in full["predictions"]} == {(3, 2, cascade[-1])}
    assert full["full_macs"] == cascade[-1] and full["policy"] == {"policy": "full"}


def test_concurrent_requests_over_many_clients_are_batched_correctly(served, serve_artifacts, direct):
    """Requests of 6 clients and 2 policies at once: batches mix them, the LRU holds 2 models."""
    cost = serve_artifacts.exit_cost
    cases = [(cid, t) for cid in serve_artifacts.client_ids for t in (0.1, 0.2)] * 2
    data = {c: serve_artifacts.client_data(c)[0][:3] for c in serve_artifacts.client_ids}

    def call(case):
        cid, t = case
        with httpx.Client(base_url=served[0].url, timeout=60) as c:
            return _post(c, cid, inputs=data[cid].tolist(), threshold=t)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, cases))
    for (cid, t), r in zip(cases, answers, strict=True):
        assert r.status_code == 200, r.text
        want = predict_batch(direct[cid], data[cid], Threshold(t), cost)
        got = r.json()
        assert got["client_id"] == cid and got["policy"]["threshold"] == t
        assert [(p["label"], p["exit_index"], p["macs"]) for p in got["predictions"]] == list(
            zip(want.labels.tolist(), want.exits.tolist(), want.macs.tolist(), strict=True))


GOOD = [[[[0.0] * 8] * 8]]  # one 1x8x8 sample
BAD = [
    # (name, request kwargs for httpx, status, text the detail must contain)
    ("malformed json", {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("not an object", {"json": [1, 2]}, 422, "dict"),
    ("missing inputs", {"json": {"policy": "full"}}, 422, "inputs"),
    ("unknown field", {"json": {"inputs": GOOD, "treshold": 0.5}}, 422, "treshold"),
    ("wrong shape", {"json": {"inputs": [[[0.0] * 8] * 8]}}, 422, "expected (batch, 1, 8, 8)"),
    ("strings", {"json": {"inputs": [[[["x"] * 8] * 8]]}}, 422, "must be numbers, got strings"),
    ("nan", {"content": json.dumps({"inputs": [[[[float("nan")] * 8] * 8]]}).encode(),
             "headers": {"content-type": "application/json"}}, 422, "NaN"),
    ("infinity", {"content": json.dumps({"inputs": [[[[float("inf")] * 8] * 8]]}).encode(),
                  "headers": {"content-type": "application/json"}}, 422, "infinite"),
    ("too large", {"json": {"inputs": GOOD * (MAX_BATCH + 1)}}, 413, f"at most {MAX_BATCH}"),
    ("threshold > 1", {"json": {"inputs": GOOD, "threshold": 1.5}}, 422, "less than or equal to 1"),
    ("threshold < 0", {"json": {"inputs": GOOD, "threshold": -0.5}}, 422, "greater than or equal to 0"),
    ("unknown policy", {"json": {"inputs": GOOD, "policy": "magic"}}, 422, "available: budget, entropy, full"),
    ("budget too small", {"json": {"inputs": GOOD, "policy": "budget", "mac_budget": 1}}, 422, "below"),
    ("header mismatch", {"json": {"inputs": GOOD}, "headers": {"serve_multiplexed_model_id": "2"}}, 400,
     "header"),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(http, name, kwargs, status, text):
    r = http.post("/v1/clients/1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert text in r.text
    ok = _post(http, 1, inputs=GOOD, policy="full")
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1


def test_unknown_client_is_404(http):
    for path in ("/v1/clients/99", "/v1/clients/99/predict"):
        r = http.post(path, json={"inputs": GOOD}) if path.endswith("predict") else http.get(path)
        assert r.status_code == 404 and "unknown client 99" in r.json()["detail"][0]["msg"]
    assert http.get("/v1/clients/abc").status_code == 422


def test_deployment_handle(served, serve_artifacts, direct):
    _, handle = served
    x, _ = serve_artifacts.client_data(2)
    resp = handle.options(multiplexed_model_id="2").predict.remote({"inputs": x[:4].tolist(), "policy": "full"})
    out = resp.result(timeout_s=60)
    assert isinstance(out, PredictResponse) and out.client_id == 2
    want = predict_batch(direct[2], x[:4], FullDepth(), serve_artifacts.exit_cost)
    assert [p.label for p in out.predictions] == want.labels.tolist()
    by_arg = handle.predict.remote({"inputs": x[:4].tolist(), "policy": "full"}, client_id=2).result(timeout_s=60)
    assert [p.label for p in by_arg.predictions] == want.labels.tolist()
    assert handle.clients.remote().result(timeout_s=60).count == 6
    assert handle.client.remote(2).result(timeout_s=60).num_exits == 3
    with pytest.raises(InvalidInput, match="expected"):
        handle.options(multiplexed_model_id="2").predict.remote({"inputs": [[1.0]]}).result(timeout_s=60)
    with pytest.raises(RequestError):
        handle.predict.remote({"inputs": GOOD}, client_id=99).result(timeout_s=60)
    with pytest.raises(UnknownClient):
        handle.options(multiplexed_model_id="99").predict.remote({"inputs": GOOD}).result(timeout_s=60)
