"""The pure request -> prediction core, without Serve, Ray or a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cafe_ray.inference import FullDepth, Threshold, predict_batch
from cafe_ray.inference import policies as registry
from cafe_ray.models import exit_macs
from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.core import (
    BatchTooLarge,
    ClientMismatch,
    InputSpec,
    InvalidInput,
    InvalidPolicy,
    Job,
    MacCap,
    PolicyDefaults,
    answer,
    cap_exit,
    client_from_model_id,
    group_jobs,
    parse_inputs,
    policy_names,
    policy_request,
    prepare_model,
    run_jobs,
)
from cafe_ray.serve.schemas import PredictRequest
from tests.conftest import make_tiny_een

IMG = InputSpec((1, 2, 2), is_text=False)
TXT = InputSpec((3,), is_text=True, vocab_size=10)
DEF = PolicyDefaults()


def req(**kw) -> PredictRequest:
    return PredictRequest(inputs=kw.pop("inputs", [[[[0.0, 0.0], [0.0, 0.0]]]]), **kw)


# ------------------------------------------------------------------ inputs
def test_parse_inputs_gives_float32_batch():
    x = parse_inputs([[[[1, 2], [3, 4.5]]], [[[0, 0], [0, 0]]]], IMG, max_batch=4)
    assert x.dtype == torch.float32 and x.shape == (2, 1, 2, 2) and x[0, 0, 1, 1] == 4.5


def test_parse_inputs_wrong_shape_names_expected_shape():
    with pytest.raises(InvalidInput, match=r"has shape \(1, 2, 2\); expected \(batch, 1, 2, 2\)"):
        parse_inputs([[[1, 2], [3, 4]]], IMG, max_batch=4)


def test_parse_inputs_ragged():
    with pytest.raises(InvalidInput, match="ragged"):
        parse_inputs([[[[1, 2], [3]]]], IMG, max_batch=4)


@pytest.mark.parametrize(("sample", "what"), [([["a", 1], [1, 1]], "strings"), ([[None, 1], [1, 1]], "nulls"),
                                              ([[True, False], [True, True]], "booleans")])
def test_parse_inputs_rejects_non_numbers(sample, what):
    with pytest.raises(InvalidInput, match=f"must be numbers, got {what}"):
        parse_inputs([[sample]], IMG, max_batch=4)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39])
def test_parse_inputs_rejects_non_finite(value):
    with pytest.raises(InvalidInput, match=r"finite .* the first at index \[0, 0, 1, 0\]"):
        parse_inputs([[[[1, 1], [value, 1]]]], IMG, max_batch=4)


def test_parse_inputs_batch_limit_is_413():
    with pytest.raises(BatchTooLarge, match="5 samples; this server takes at most 4") as e:
        parse_inputs([[[[0, 0], [0, 0]]]] * 5, IMG, max_batch=4)
    assert e.value.status_code == 413


def test_parse_inputs_text_token_ids():
    x = parse_inputs([[1, 2, 9]], TXT, max_batch=4)
    assert x.dtype == torch.int64 and x.tolist() == [[1, 2, 9]]
    with pytest.raises(InvalidInput, match=r"token ids must lie in \[0, 10\), got values in \[1, 10\]"):
        parse_inputs([[1, 2, 10]], TXT, max_batch=4)
    with pytest.raises(InvalidInput, match="integer token ids"):
        parse_inputs([[1.5, 2, 3]], TXT, max_batch=4)


# ------------------------------------------------------------------ policies
def test_policy_names_come_from_the_registry_at_call_time(monkeypatch):
    monkeypatch.setitem(registry._POLICIES, "always_first", lambda: Threshold(0.0))
    assert "always_first" in policy_names()
    assert policy_request(req(policy="always_first"), DEF) == ("always_first", ())


def test_unknown_policy_lists_available():
    with pytest.raises(InvalidPolicy, match=r"unknown policy 'nope'; available: budget, entropy, full"):
        policy_request(req(policy="nope"), DEF)


def test_policy_defaults_and_parameters():
    assert policy_request(req(), DEF) == ("threshold", (("threshold", 0.6),))
    assert policy_request(req(threshold=0.0), DEF) == ("threshold", (("threshold", 0.0),))
    assert policy_request(req(policy="entropy"), DEF) == ("entropy", (("max_entropy", 0.5),))
    assert policy_request(req(policy="full"), DEF) == ("full", ())
    assert policy_request(req(policy="learned"), DEF) == ("learned", ())
    assert policy_request(req(policy="learned", mac_budget=5), DEF) == ("learned", (("budget", 5.0),))


def test_parameter_of_another_policy_is_rejected():
    with pytest.raises(InvalidPolicy, match=r"threshold does not apply to policy 'full' \(it takes no param"):
        policy_request(req(policy="full", threshold=0.5), DEF)
    with pytest.raises(InvalidPolicy, match=r"mac_budget does not apply to policy 'threshold' \(it takes thr"):
        policy_request(req(mac_budget=100), DEF)


def test_budget_defaults_to_the_device_profile_budget():
    assert policy_request(req(policy="budget"), DEF, profile_budget=500) == ("budget", (("budget", 500.0),))
    assert policy_request(req(policy="budget", mac_budget=9), DEF, 500) == ("budget", (("budget", 9.0),))
    with pytest.raises(InvalidPolicy, match="needs mac_budget"):
        policy_request(req(policy="budget"), DEF, profile_budget=None)


@pytest.mark.parametrize("field", [{"threshold": 1.5}, {"threshold": -0.1}, {"mac_budget": 0},
                                   {"max_entropy": -1}, {"threshold": math.nan}, {"colour": 1}])
def test_request_model_rejects_out_of_range(field):
    with pytest.raises(ValueError):
        req(**field)


def test_cap_exit_is_the_deepest_exit_that_fits():
    assert cap_exit([10, 30, 60], 10) == 0
    assert cap_exit([10, 30, 60], 59.9) == 1
    assert cap_exit([10, 30, 60], 1e9) == 2
    with pytest.raises(ValueError, match="below exit 1's 10 MACs"):
        cap_exit([10, 30, 60], 9)


def test_mac_cap_never_exceeds_the_budget():
    model = make_tiny_een()
    cost = exit_macs(model, (8,))
    budget = cost.cascade[1] + 1
    pred = predict_batch(model, torch.randn(5, 8), MacCap(cost.cascade, budget), cost)
    assert pred.exits.tolist() == [1] * 5 and int(pred.macs.max()) <= budget


# ------------------------------------------------------------------ jobs
def _job(cid: int, n: int, policy=None, key=("full", ()), seed: int = 0) -> Job:
    g = torch.Generator().manual_seed(seed)
    return Job(cid, torch.randn(n, 8, generator=g), key, policy or FullDepth())


def test_group_jobs_by_client_and_policy():
    t = ("threshold", (("threshold", 0.5),))
    jobs = [_job(1, 1), _job(2, 1), _job(1, 2), _job(1, 1, Threshold(0.5), t)]
    assert group_jobs(jobs) == [[0, 2], [1], [3]]


def test_group_jobs_caps_the_samples_of_one_model_call():
    jobs = [_job(1, 3), _job(1, 2), _job(2, 1), _job(1, 4), _job(1, 1), _job(1, 9)]
    assert group_jobs(jobs, max_samples=5) == [[0, 1], [2], [3, 4], [5]]  # 3+2 | 4+1 | 9 alone
    assert group_jobs(jobs, max_samples=None) == [[0, 1, 3, 4, 5], [2]]
    models = {1: make_tiny_een(seed=1), 2: make_tiny_een(seed=2)}
    cost = exit_macs(models[1], (8,))
    seen = []
    out = run_jobs(jobs, models, cost, on_group=lambda g, a, s: seen.append(sum(j.x.shape[0] for j in g)),
                   max_samples=5)
    assert seen == [5, 1, 5, 9] and all(len(a.response().predictions) == j.x.shape[0] for a, j in zip(out, jobs,
                                                                                                    strict=True))


def test_run_jobs_equals_one_predict_batch_per_request():
    models = {1: make_tiny_een(seed=1), 2: make_tiny_een(seed=2)}
    cost = exit_macs(models[1], (8,))
    t = ("threshold", (("threshold", 0.3),))
    jobs = [_job(1, 3, seed=1), _job(2, 2, seed=2), _job(1, 1, Threshold(0.3), t, seed=3), _job(1, 4, seed=4)]
    out = run_jobs(jobs, models, cost)
    for j, ans in zip(jobs, out, strict=True):
        got = ans.response()
        assert json.loads(ans.json_bytes()) == got.model_dump()  # HTTP's bytes say what the model says
        want = answer(j.client_id, j.policy, predict_batch(models[j.client_id], j.x, j.policy, cost), cost, False)
        assert [(p.label, p.exit, p.macs) for p in got.predictions] == \
            [(p.label, p.exit, p.macs) for p in want.predictions]
        assert [p.confidence for p in got.predictions] == \
            pytest.approx([p.confidence for p in want.predictions], abs=1e-5)
        assert got.policy == want.policy and got.client_id == j.client_id


def test_run_jobs_isolates_a_failing_group():
    model = make_tiny_een()
    cost = exit_macs(model, (8,))

    def get(cid: int):
        if cid == 9:
            raise RuntimeError("model 9 failed to load")
        return model

    out = run_jobs([_job(9, 1), _job(1, 2)], get, cost)
    assert isinstance(out[0], RuntimeError) and len(out[1].response().predictions) == 2


def test_answer_numbers_exits_both_ways_and_counts_macs():
    model = make_tiny_een()
    cost = exit_macs(model, (8,))
    x = torch.randn(3, 8)
    first = answer(0, Threshold(0.0), predict_batch(model, x, Threshold(0.0), cost), cost, True)
    assert {(p.exit, p.exit_index, p.macs) for p in first.predictions} == {(1, 0, cost.cascade[0])}
    assert all(len(p.probs) == 4 and abs(sum(p.probs) - 1) < 1e-5 for p in first.predictions)
    full = answer(0, FullDepth(), predict_batch(model, x, FullDepth(), cost), cost, False)
    assert {(p.exit, p.exit_index, p.macs, p.probs) for p in full.predictions} == {(3, 2, cost.cascade[-1], None)}
    assert full.full_macs == cost.cascade[-1] and full.num_exits == 3


def test_prepare_model_keeps_the_answers():
    from cafe_ray.models import cnn_small

    torch.manual_seed(0)
    model = cnn_small((1, 8, 8), 10, width=4).eval()
    cost = exit_macs(model, (1, 8, 8))
    x = torch.randn(6, 1, 8, 8)
    want = predict_batch(model, x, Threshold(0.12), cost)
    fast = prepare_model(cnn_small((1, 8, 8), 10, width=4))
    fast.load_state_dict(model.state_dict())
    assert fast.stages[0][0].weight.is_contiguous() and not fast.training
    assert not any(p.requires_grad for p in fast.parameters())
    (ans,) = run_jobs([Job(0, x, ("threshold", (("threshold", 0.12),)), Threshold(0.12), True)], {0: fast}, cost)
    got = ans.response()
    assert [p.label for p in got.predictions] == want.labels.tolist()
    assert torch.tensor([p.probs for p in got.predictions]) == pytest.approx(want.probs, abs=1e-5)


# ------------------------------------------------------------------ client ids, config
def test_client_from_model_id():
    assert client_from_model_id(3, None) == 3
    assert client_from_model_id(None, "4") == 4
    assert client_from_model_id(4, "4") == 4
    with pytest.raises(ClientMismatch, match="names client 3 but its multiplexed model id is '4'"):
        client_from_model_id(3, "4")
    with pytest.raises(InvalidInput, match="not a client id"):
        client_from_model_id(None, "abc")
    with pytest.raises(InvalidInput, match="no client id"):
        client_from_model_id(None, "")


def test_serve_config_defaults_are_safe(tmp_path):
    cfg = ServeConfig(run_dir=str(tmp_path / "run"), batch_max_requests=100, max_ongoing_requests=10)
    assert cfg.host == "127.0.0.1" and cfg.url == "http://127.0.0.1:8000"
    assert cfg.run_dir == str((tmp_path / "run").resolve())
    assert cfg.max_ongoing_requests == 100  # never below one full batch
    with pytest.raises(ValueError, match="route_prefix must start with '/'"):
        ServeConfig(run_dir="x", route_prefix="api")
