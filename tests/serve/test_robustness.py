"""Pathological requests over real HTTP: finite values that overflow the model, JSON nested too
deep or holding too many values, wrong methods, query parameters the schema declares, and
strings the error encoder must survive. Each is a 4xx, and the server keeps serving."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import MAX_BATCH, MAX_BODY
from tests.serve.test_strict_api import ONE, assert_error_shape, post_raw, still_serving


@pytest.mark.parametrize("value", [1e30, -1e30, 3e38])
def test_finite_values_that_overflow_the_model_are_422(http, value):
    """float32-representable, so they pass the finiteness check; the model's outputs do not."""
    good = [[[0.5] * 8] * 8]
    body = {"inputs": [good, [[[value] * 8] * 8]], "policy": "full"}
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json=body), 422)
    assert detail[0]["loc"] == ["body", "inputs"] and detail[0]["type"] == "invalid_input"
    assert "NaN or infinity" in detail[0]["msg"] and "index 1" in detail[0]["msg"]
    still_serving(http)


def test_an_overflowing_request_does_not_spoil_the_requests_batched_with_it(served, serve_artifacts):
    """Same client, same policy, sent at once: serve.batch runs them as one forward pass."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    x, _ = serve_artifacts.client_data(3)
    bodies = [{"inputs": x[:2].tolist(), "policy": "full"}, {"inputs": [[[[1e30] * 8] * 8]], "policy": "full"}] * 4

    def call(body):
        with httpx.Client(base_url=served[0].url, timeout=60) as c:
            return c.post("/v1/clients/3/predict", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, bodies))
    assert codes == [200, 422] * 4


def nested(depth: int, inner: str = "0") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


@pytest.mark.parametrize("body", [
    nested(30_000),  # 60 kB of brackets: Python's json parser would recurse 30,000 deep
    b'{"inputs": ' + nested(20_000) + b"}",
    b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
])
def test_deeply_nested_json_is_422_before_parsing(http, body):
    assert len(body) < MAX_BODY  # not the byte cap: the depth check
    detail = assert_error_shape(post_raw(http, body), 422)
    assert detail[0]["type"] == "json_too_deep" and "at most 32" in detail[0]["msg"]
    still_serving(http)


def test_brackets_inside_strings_do_not_count_as_depth(http):
    body = json.dumps({"inputs": ONE, "policy": "[" * 100 + '\\"{' * 50}).encode()
    detail = assert_error_shape(post_raw(http, body), 422)
    assert detail[0]["type"] == "invalid_policy"  # parsed, then refused for what it says


def test_more_values_than_max_batch_samples_is_413_before_parsing(http):
    n = MAX_BATCH * 64 + 100  # 64 values per 1x8x8 sample
    detail = assert_error_shape(post_raw(http, json.dumps({"inputs": [0] * n}).encode()), 413)
    assert detail[0]["type"] == "too_many_values" and "max_batch" in detail[0]["msg"]


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v1/clients", "GET"), ("POST", "/healthz", "GET"), ("DELETE", "/v1/stats", "GET"),
    ("PUT", "/v1/clients/1/predict", "POST"), ("GET", "/v1/clients/1/predict", "POST"),
    ("PATCH", "/v1/clients/1", "GET"),
])
@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}])
def test_a_wrong_method_is_405_whatever_the_content_type(http, method, path, allow, headers):
    r = http.request(method, path, content=b"x", headers=headers)
    detail = assert_error_shape(r, 405)
    assert detail[0]["loc"] == ["method"] and allow in r.headers["allow"]


def test_the_query_parameters_the_schema_declares_work_with_a_json_body(http):
    schema = http.get("/openapi.json").json()
    params = {p["name"] for p in schema["paths"]["/v1/clients/{client_id}/predict"]["post"]["parameters"]
              if p["in"] == "query"}
    assert {"policy", "threshold", "return_probs", "latency_slo_ms"} <= params
    r = http.post("/v1/clients/1/predict", json={"inputs": ONE * 3},
                  params={"policy": "threshold", "threshold": "0", "return_probs": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == {"policy": "threshold", "threshold": 0.0}
    assert {p["exit"] for p in body["predictions"]} == {1} and body["predictions"][0]["probs"] is not None
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json={"inputs": ONE, "threshold": 0.5},
                                          params={"threshold": "0.2"}), 422)
    assert detail[0]["loc"] == ["query", "threshold"] and detail[0]["type"] == "duplicate_field"
    detail = assert_error_shape(http.post("/v1/clients/1/predict", json={"inputs": ONE}, params={"colour": "red"}),
                                422)
    assert detail[0]["loc"] == ["query", "colour"]


@pytest.mark.parametrize("raw", [
    '{"inputs": %s, "\\ud800": 1}',  # a lone surrogate as a field name: echoed in loc
    '{"inputs": %s, "policy": "\\udfff"}',
])
def test_lone_surrogates_in_the_request_do_not_break_the_error_answer(http, raw):
    detail = assert_error_shape(post_raw(http, raw % json.dumps(ONE)), 422)
    assert detail


def test_a_huge_integer_is_a_4xx(http):
    big = "9" * 5000
    for body in ('{"inputs": [[[[' + big + ']]]]}', '{"inputs": ' + json.dumps(ONE) + ', "threshold": 1' + "0" * 400 + "}"):
        r = post_raw(http, body)
        assert 400 <= r.status_code < 500, r.text
