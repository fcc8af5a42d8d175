"""ModelService on a real run, in this process (what a replica does, minus Serve)."""

from __future__ import annotations

import pytest
import torch

from cafe_ray.inference import Threshold, predict_batch
from cafe_ray.inference import policies as registry
from cafe_ray.inference.learned import ExitMLP, PolicySpec, save_policy
from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.core import BatchTooLarge, InvalidInput, InvalidPolicy, UnknownClient
from cafe_ray.serve.service import ModelService, learned_paths


def test_predict_matches_the_model_run_directly(service, serve_artifacts):
    x, _ = serve_artifacts.client_data(2)
    x = x[:6]
    got = service.predict(2, {"inputs": x.tolist(), "policy": "threshold", "threshold": 0.15, "return_probs": True})
    cost = serve_artifacts.exit_cost
    want = predict_batch(serve_artifacts.client_model(2), x, Threshold(0.15), cost)
    assert [p.label for p in got.predictions] == want.labels.tolist()
    assert [p.exit_index for p in got.predictions] == want.exits.tolist()
    assert [p.macs for p in got.predictions] == want.macs.tolist()
    assert torch.tensor([p.probs for p in got.predictions]) == pytest.approx(want.probs, abs=1e-6)
    assert got.policy == {"policy": "threshold", "threshold": 0.15}


def test_client_detail_reports_exits_macs_and_accuracy(service, serve_artifacts):
    d = service.client_detail(1)
    cost = serve_artifacts.exit_cost
    assert d.input_shape == [1, 8, 8] and d.input_dtype == "float32" and d.num_exits == 3
    assert [e.macs for e in d.exits] == cost.cascade and d.full_macs == cost.cascade[-1]
    assert [e.exit for e in d.exits] == [1, 2, 3] and [e.exit_index for e in d.exits] == [0, 1, 2]
    assert [e.test_accuracy for e in d.exits] == serve_artifacts.last_eval()[1]
    assert d.profile == serve_artifacts.profiles[1]


def test_clients_lists_ids_and_profiles(service, serve_artifacts):
    c = service.clients()
    assert c.count == 6 and [s.client_id for s in c.clients] == serve_artifacts.client_ids
    assert c.clients[0].profile["name"] == serve_artifacts.profiles[0]["name"]


def test_errors(service, serve_artifacts):
    x, _ = serve_artifacts.client_data(0)
    with pytest.raises(UnknownClient, match=r"unknown client 42; this run has 6 clients \(ids 0..5\)"):
        service.predict(42, {"inputs": x[:1].tolist()})
    with pytest.raises(BatchTooLarge, match="at most 8"):
        service.predict(0, {"inputs": x[:9].tolist()})
    with pytest.raises(InvalidInput, match=r"expected \(batch, 1, 8, 8\)"):
        service.predict(0, {"inputs": x[:2, 0].tolist()})


def test_budget_uses_the_registered_calibrated_threshold(service, serve_artifacts):
    cascade = serve_artifacts.exit_cost.cascade
    budget = (cascade[0] + cascade[-1]) / 2
    x, _ = serve_artifacts.client_data(3, "val")
    got = service.predict(3, {"inputs": x[:8].tolist(), "policy": "budget", "mac_budget": budget})
    assert got.policy["policy"] == "budget" and got.policy["budget"] == budget
    assert got.policy["calibrated_macs"] <= budget  # mean MACs on the client's val split
    with pytest.raises(InvalidPolicy, match="below the first exit"):
        service.predict(3, {"inputs": x[:1].tolist(), "policy": "budget", "mac_budget": cascade[0] - 1})


def test_budget_falls_back_to_a_per_sample_cap_when_unregistered(serve_run_dir, serve_artifacts, monkeypatch):
    monkeypatch.delitem(registry._POLICIES, "budget")
    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir)))
    cascade = serve_artifacts.exit_cost.cascade
    x, _ = serve_artifacts.client_data(0)
    got = svc.predict(0, {"inputs": x[:5].tolist(), "policy": "budget", "mac_budget": cascade[1] + 1})
    assert got.policy == {"policy": "budget", "budget": cascade[1] + 1, "rule": "per-sample cap", "exit": 2}
    assert {(p.exit, p.macs) for p in got.predictions} == {(2, cascade[1])}


def test_learned_policy_needs_a_configured_file(service, serve_artifacts):
    x, _ = serve_artifacts.client_data(0)
    with pytest.raises(InvalidPolicy, match="no learned policy; start it with .* --learned PATH"):
        service.predict(0, {"inputs": x[:1].tolist(), "policy": "learned"})


def test_learned_policy_from_a_per_client_folder(serve_run_dir, serve_artifacts, tmp_path):
    cost = serve_artifacts.exit_cost
    spec = PolicySpec(hidden=(4,), activation="tanh", shift=(0.0,) * 6, scale=(1.0,) * 6,
                      full_macs=cost.cascade[-1], num_classes=10)
    torch.manual_seed(0)
    mlp = ExitMLP(spec)
    with torch.no_grad():  # always exit: logit 1 >> logit 0
        mlp.linears()[-1].bias.copy_(torch.tensor([-10.0, 10.0]))
    save_policy(mlp, tmp_path / "pol" / "client_1" / "policy")
    assert learned_paths(tmp_path / "pol") == {1: tmp_path / "pol" / "client_1" / "policy.safetensors"}
    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), learned=str(tmp_path / "pol")))
    x, _ = serve_artifacts.client_data(1)
    got = svc.predict(1, {"inputs": x[:3].tolist(), "policy": "learned", "mac_budget": cost.cascade[-1] / 2})
    assert got.policy["policy"] == "learned" and got.policy["budget"] == pytest.approx(0.5)
    assert {p.exit for p in got.predictions} == {1}
    with pytest.raises(InvalidPolicy, match="have none for client 2"):
        svc.predict(2, {"inputs": x[:1].tolist(), "policy": "learned"})


def test_a_fitted_policy_is_served_per_client_and_calibrated_to_a_budget(serve_run_dir, serve_artifacts, tmp_path):
    """`policy fit` output behind policy=learned: bound to the client's label prior, answering with
    the combined exits; a mac_budget calibrates it on the client's val split."""
    from cafe_ray.inference.cascade import (
        CascadePolicy,
        FitSettings,
        client_prior,
        fit_for_run,
        save_cascade,
    )
    from cafe_ray.inference.trace import ExitTrace

    net = fit_for_run(serve_run_dir, FitSettings())
    w, _ = save_cascade(net, tmp_path / "fitted" / "policy", lam=0.3)
    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), learned=str(tmp_path / "fitted")))
    cost, model = serve_artifacts.exit_cost, serve_artifacts.client_model(1)
    x, _ = serve_artifacts.client_data(1)
    x = x[:8]
    own = CascadePolicy(w).for_client(client_prior(serve_artifacts, 1))
    got = svc.predict(1, {"inputs": x.tolist(), "policy": "learned"})
    want = predict_batch(model, x, own, cost)
    assert [p.label for p in got.predictions] == want.labels.tolist()
    assert [p.exit_index for p in got.predictions] == want.exits.tolist()
    assert got.policy["policy"] == "cascade" and got.policy["lam"] == pytest.approx(0.3)
    assert got.policy["combine"] == "prior" and got.policy["path"] == "policy.safetensors"
    budget = cost.cascade[-1] * 0.5
    xv, yv = serve_artifacts.client_data(1, "val")
    lam, _ = own.calibrate(ExitTrace.from_model(model, xv, yv, cost), budget)
    got = svc.predict(1, {"inputs": x.tolist(), "policy": "learned", "mac_budget": budget})
    assert got.policy["lam"] == pytest.approx(lam)
    assert [p.exit_index for p in got.predictions] == predict_batch(model, x, own.with_lam(lam), cost).exits.tolist()
    # a policy fitted on another architecture is refused with the command that fits one here
    other = CascadePolicy(net=net).spec
    bad = type(other)(**{**other.__dict__, "exit_macs": tuple(m + 1 for m in other.exit_macs)})
    save_cascade(type(net)(bad), tmp_path / "other" / "policy")
    svc = ModelService(ServeConfig(run_dir=str(serve_run_dir), learned=str(tmp_path / "other")))
    with pytest.raises(InvalidPolicy, match="fit one on this run"):
        svc.predict(1, {"inputs": x[:1].tolist(), "policy": "learned"})


def test_learned_paths_reports_a_missing_policy(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors not found"):
        learned_paths(tmp_path / "nope.safetensors")
