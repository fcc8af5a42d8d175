"""The strict HTTP API over real HTTP: no 500 on non-finite values, no coercion, a body cap
before parsing, Content-Type checks, one error shape, a valid OpenAPI example, binary inputs,
and no server paths in any answer."""

from __future__ import annotations

import base64
import contextlib
import io
import json

import httpx
import numpy as np
import pytest
import torch

from cafe_ray.inference.learned import ExitMLP, PolicySpec, save_policy
from tests.serve.conftest import MAX_BATCH, MAX_BODY

JSON_CT = {"content-type": "application/json"}
ONE = [[[[0.0] * 8] * 8]]  # one 1x8x8 sample


def post_raw(http, body: bytes | str, cid: int = 1, headers: dict | None = None, **kw) -> httpx.Response:
    return http.post(f"/v1/clients/{cid}/predict", content=body, headers=JSON_CT if headers is None else headers,
                     **kw)


def assert_error_shape(r: httpx.Response, status: int) -> list[dict]:
    """Every 4xx: {"detail": [{"loc": list, "msg": str, "type": str}, ...]} and nothing else."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], list) and body["detail"]
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}
        assert isinstance(item["loc"], list) and isinstance(item["msg"], str) and isinstance(item["type"], str)
    return body["detail"]


def still_serving(http) -> None:
    ok = http.post("/v1/clients/1/predict", json={"inputs": ONE, "policy": "full"})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1


# ------------------------------------------------------------------ non-finite scalars never 500
@pytest.mark.parametrize("field", ["threshold", "max_entropy", "mac_budget"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_parameters_are_422_not_500(http, field, value):
    policy = {"threshold": "threshold", "max_entropy": "entropy", "mac_budget": "budget"}[field]
    body = f'{{"inputs": {json.dumps(ONE)}, "policy": "{policy}", "{field}": {value}}}'
    detail = assert_error_shape(post_raw(http, body), 422)
    assert detail[0]["loc"] == ["body", field] and detail[0]["type"] == "finite_number"
    still_serving(http)


# ------------------------------------------------------------------ strict types
@pytest.mark.parametrize(("field", "value", "kind"), [
    ("threshold", "0.7", "float_type"),
    ("mac_budget", "1000", "float_type"),
    ("return_probs", "yes", "bool_type"),
    ("return_probs", 1, "bool_type"),
    ("policy", 5, "string_type"),
    ("inputs", "[[1]]", "list_type"),
])
def test_no_coercion_of_json_types(http, field, value, kind):
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json={"inputs": ONE, field: value}), 422)
    assert detail[0]["loc"] == ["body", field] and detail[0]["type"] == kind


def test_integers_are_numbers(http):
    r = http.post("/v1/clients/1/predict", json={"inputs": ONE, "threshold": 1, "return_probs": True})
    assert r.status_code == 200 and r.json()["policy"] == {"policy": "threshold", "threshold": 1.0}


def test_empty_policy_name_is_422(http):
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json={"inputs": ONE, "policy": ""}), 422)
    assert detail[0]["loc"] == ["body", "policy"] and detail[0]["type"] == "string_too_short"


# ------------------------------------------------------------------ body cap before parsing
def test_body_over_the_cap_is_413_before_parsing(http):
    """Malformed JSON over the cap answers 413 (not a JSON error): nothing parsed it."""
    junk = b'{"inputs": [' + b"x" * (MAX_BODY + 10)
    detail = assert_error_shape(post_raw(http, junk), 413)
    assert detail[0]["type"] == "body_too_large" and str(MAX_BODY) in detail[0]["msg"]
    assert "--max-body-mb" in detail[0]["msg"]
    assert_error_shape(post_raw(http, junk[: MAX_BODY // 2]), 422)  # the same junk under the cap is parsed
    still_serving(http)


def test_chunked_body_over_the_cap_is_413(http):
    """Without Content-Length the guard counts bytes as they arrive."""
    def chunks():
        yield b'{"inputs": ['
        for _ in range(2 * MAX_BODY // 4096):
            yield b"1," * 2048

    r = post_raw(http, chunks())
    assert "content-length" not in r.request.headers
    detail = assert_error_shape(r, 413)
    assert str(MAX_BODY) in detail[0]["msg"]
    still_serving(http)


# ------------------------------------------------------------------ Content-Type
@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}, {"content-type": "application/xml"}])
def test_missing_or_wrong_content_type_is_415(http, headers):
    r = post_raw(http, json.dumps({"inputs": ONE}), headers=headers)
    detail = assert_error_shape(r, 415)
    assert detail[0]["loc"] == ["header", "content-type"] and detail[0]["type"] == "unsupported_media_type"
    assert "application/json" in detail[0]["msg"] and "application/x-npy" in detail[0]["msg"]


def test_content_type_parameters_are_fine(http):
    r = post_raw(http, json.dumps({"inputs": ONE}), headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ one error shape
def test_every_4xx_has_the_same_shape(http):
    cases = [
        (http.get("/v1/clients/99"), 404), (http.get("/v1/clients/abc"), 422), (http.get("/nope"), 404),
        (http.delete("/v1/clients/1/predict"), 405), (http.post("/v1/clients/99/predict", json={"inputs": ONE}), 404),
        (http.post("/v1/clients/1/predict", json={"inputs": ONE * (MAX_BATCH + 1)}), 413),
        (http.post("/v1/clients/1/predict", json={"inputs": ONE}, headers={"serve_multiplexed_model_id": "2"}), 400),
        (post_raw(http, b'{"inputs": ['), 422), (post_raw(http, b"[1, 2]"), 422),
        (http.post("/v1/clients/1/predict", json={"inputs": ONE, "policy": "magic"}), 422),
        (http.post("/v1/clients/1/predict", json={"inputs": [[1.0]]}), 422),
        (http.post("/v1/clients/1/predict", json={"inputs": ONE, "treshold": 0.5}), 422),
        (http.post("/v1/clients/1/predict", json={}), 422),
    ]
    for r, status in cases:
        assert_error_shape(r, status)


def test_openapi_documents_the_error_shape_for_every_4xx(http):
    schema = http.get("/openapi.json").json()
    comps = schema["components"]["schemas"]
    assert "HTTPValidationError" not in comps and "ErrorResponse" in comps
    assert comps["ErrorResponse"]["properties"]["detail"]["type"] == "array"
    seen = 0
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for code, resp in op["responses"].items():
                if code.startswith("4"):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorResponse", (path, code)
                    seen += 1
    predict = schema["paths"]["/v1/clients/{client_id}/predict"]["post"]
    assert {"400", "404", "413", "415", "422"} <= set(predict["responses"])
    assert set(predict["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    assert seen >= 7


def test_openapi_example_is_a_valid_request_for_the_served_model(http):
    schema = http.get("/openapi.json").json()
    body = schema["paths"]["/v1/clients/{client_id}/predict"]["post"]["requestBody"]["content"]["application/json"]
    example = body["example"]
    assert schema["components"]["schemas"]["PredictRequest"]["examples"] == [example]
    shape = http.get("/v1/clients/0").json()["input_shape"]
    assert list(np.asarray(example["inputs"]).shape) == [1, *shape]
    r = http.post("/v1/clients/0/predict", json=example)
    assert r.status_code == 200, r.text
    docs = http.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


# ------------------------------------------------------------------ binary inputs
def _json_answer(http, x: torch.Tensor, **params) -> list:
    r = http.post("/v1/clients/2/predict", json={"inputs": x.tolist(), **params})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_npy_body_answers_like_json(http, serve_artifacts):
    x, _ = serve_artifacts.client_data(2)
    x = x[:MAX_BATCH]
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    r = http.post("/v1/clients/2/predict", content=buf.getvalue(), params={"threshold": "0.15", "return_probs": "true"},
                  headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == _json_answer(http, x, threshold=0.15, return_probs=True)
    assert r.json()["policy"] == {"policy": "threshold", "threshold": 0.15}


def test_base64_inputs_answer_like_json(http, serve_artifacts):
    x, _ = serve_artifacts.client_data(2)
    x = x[:5]
    b64 = base64.b64encode(x.numpy().astype("<f4").tobytes()).decode()
    r = http.post("/v1/clients/2/predict", json={"inputs_b64": b64, "policy": "full"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == _json_answer(http, x, policy="full")


@pytest.mark.parametrize(("kwargs", "status", "loc", "text"), [
    ({"json": {"inputs_b64": "!!notbase64"}}, 422, ["body", "inputs_b64"], "not valid base64"),
    ({"json": {"inputs_b64": base64.b64encode(b"\0" * 10).decode()}}, 422, ["body", "inputs_b64"], "whole number"),
    ({"json": {"inputs_b64": base64.b64encode(np.full(64, np.nan, "<f4").tobytes()).decode()}}, 422,
     ["body", "inputs_b64"], "NaN"),
    ({"json": {"inputs": ONE, "inputs_b64": "AAAA"}}, 422, ["body"], "exactly one of inputs"),
    ({"json": {"policy": "full"}}, 422, ["body"], "exactly one of inputs"),
    ({"content": b"not npy", "headers": {"content-type": "application/x-npy"}}, 422, ["body"], "not a .npy"),
    ({"content": b"x", "headers": {"content-type": "application/x-npy"}, "params": {"colour": "red"}}, 422,
     ["query", "colour"], "unknown query parameter"),
    ({"json": {"inputs": ONE, "policy": "full"}, "params": {"threshold": "0.5"}}, 422, ["body", "policy"],
     "does not apply"),
])
def test_binary_input_errors(http, kwargs, status, loc, text):
    detail = assert_error_shape(http.post("/v1/clients/1/predict", **kwargs), status)
    assert detail[0]["loc"] == loc and text in detail[0]["msg"]


def test_npy_errors_name_the_problem(http):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    ct = {"content-type": "application/x-npy"}
    r = http.post("/v1/clients/1/predict", content=npy(np.zeros((2, 8, 8), "f4")), headers=ct)
    assert "expected (batch, 1, 8, 8)" in assert_error_shape(r, 422)[0]["msg"]
    r = http.post("/v1/clients/1/predict", content=npy(np.zeros((MAX_BATCH + 1, 1, 8, 8), "f4")), headers=ct)
    assert assert_error_shape(r, 413)[0]["type"] == "batch_too_large"
    r = http.post("/v1/clients/1/predict", content=npy(np.zeros((1, 1, 8, 8), "f4")), headers=ct,
                  params={"threshold": "nan"})
    assert assert_error_shape(r, 422)[0]["loc"] == ["query", "threshold"]


# ------------------------------------------------------------------ no server paths
@contextlib.contextmanager
def another_app(served, run_dir, name: str, learned: str):
    """One more application on the same Serve proxy at /NAME, started with ``--learned``."""
    from ray import serve

    from cafe_ray.serve.app import start
    from cafe_ray.serve.config import ServeConfig

    cfg = ServeConfig(run_dir=str(run_dir), port=served[0].port, replica_cpus=0, max_batch=MAX_BATCH,
                      app_name=f"cafe-ray-{name}", route_prefix=f"/{name}", learned=learned)
    start(cfg)
    try:
        yield cfg
    finally:
        serve.delete(cfg.app_name)


@pytest.fixture(scope="module")
def learned_app(served, serve_run_dir, serve_artifacts, tmp_path_factory):
    """A second application on the same Serve proxy, started with a learned policy file."""
    cost = serve_artifacts.exit_cost
    spec = PolicySpec(hidden=(4,), activation="tanh", shift=(0.0,) * 6, scale=(1.0,) * 6,
                      full_macs=cost.cascade[-1], num_classes=10,
                      meta={"run_dir": str(serve_run_dir), "clients": "all"})  # as `policy train` writes it
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("learned") / "policies" / "mine"
    save_policy(ExitMLP(spec), path)
    with another_app(served, serve_run_dir, "learned", str(path) + ".safetensors") as cfg:
        yield cfg, path


def test_no_absolute_server_paths_in_any_answer(http, learned_app, serve_run_dir):
    cfg, path = learned_app
    secrets = {str(serve_run_dir), str(serve_run_dir.parent), str(path.parent), "/tmp/"}
    answers = [
        http.get("/healthz"), http.get("/v1/policies"), http.get("/v1/clients"), http.get("/v1/clients/0"),
        http.get("/openapi.json"), http.post("/v1/clients/0/predict", json={"inputs": ONE, "policy": "learned"}),
        http.get("/learned/healthz"), http.get("/learned/v1/policies"),
        http.post("/learned/v1/clients/0/predict", json={"inputs": ONE, "policy": "learned"}),
        http.post("/learned/v1/clients/0/predict", json={"inputs": ONE, "policy": "learned", "mac_budget": 1.0}),
    ]
    for r in answers:
        assert r.status_code < 500, r.text
        for s in secrets:
            assert s not in r.text, (r.request.url, s, r.text[:300])
    assert answers[0].json()["run"] == serve_run_dir.name
    assert answers[7].json()["learned"] == "mine.safetensors"
    learned = answers[8].json()
    assert answers[8].status_code == 200 and learned["policy"]["path"] == "mine.safetensors"
    assert learned["policy"]["trained"]["run_dir"] == serve_run_dir.name


# ------------------------------------------------------------------ a fitted policy over HTTP
@pytest.fixture(scope="module")
def fitted_app(served, serve_run_dir, tmp_path_factory):
    """A third application on the same proxy, started with a `policy fit` output as --learned."""
    from cafe_ray.inference.cascade import FitSettings, fit_for_run, save_cascade

    folder = tmp_path_factory.mktemp("fitted") / "combined"
    save_cascade(fit_for_run(serve_run_dir, FitSettings()), folder / "policy")
    with another_app(served, serve_run_dir, "fitted", str(folder)) as cfg:
        yield cfg, folder


def test_a_fitted_policy_answers_over_http(http, fitted_app, serve_artifacts):
    from cafe_ray.inference import predict_batch
    from cafe_ray.inference.cascade import CascadePolicy, client_prior

    _, folder = fitted_app
    x, _ = serve_artifacts.client_data(1)
    x = x[:MAX_BATCH]
    r = http.post("/fitted/v1/clients/1/predict", json={"inputs": x.tolist(), "policy": "learned"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"]["policy"] == "cascade" and body["policy"]["decide"] == "threshold"
    assert str(folder) not in r.text and "/tmp/" not in r.text
    own = CascadePolicy(folder / "policy.safetensors").for_client(client_prior(serve_artifacts, 1))
    want = predict_batch(serve_artifacts.client_model(1), x, own, serve_artifacts.exit_cost)
    assert [p["label"] for p in body["predictions"]] == want.labels.tolist()
    assert [p["exit_index"] for p in body["predictions"]] == want.exits.tolist()
    budget = serve_artifacts.exit_cost.cascade[-1] * 0.5
    r = http.post("/fitted/v1/clients/1/predict", json={"inputs": x.tolist(), "policy": "learned",
                                                         "mac_budget": budget})
    from cafe_ray.inference.trace import ExitTrace

    xv, yv = serve_artifacts.client_data(1, "val")
    lam, _ = own.calibrate(ExitTrace.from_model(serve_artifacts.client_model(1), xv, yv,
                                                serve_artifacts.exit_cost), budget)
    assert r.status_code == 200 and r.json()["policy"]["lam"] == pytest.approx(lam)
