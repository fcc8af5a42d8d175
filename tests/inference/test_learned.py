"""Learned policies: safetensors + JSON round trip, and the env and predict_batch agreeing."""

import json

import numpy as np
import pytest
import torch

from cafe_ray.envs import EarlyExitEnv
from cafe_ray.inference import (
    ExitMLP,
    LearnedPolicy,
    PolicySpec,
    build_policy,
    predict_batch,
    save_policy,
)
from cafe_ray.inference.learned import load_policy_mlp
from cafe_ray.inference.observation import observation_bounds
from tests.inference.helpers import HAND_COST, as_input, sliced_een


def random_mlp(seed: int = 0, num_classes: int = 4, budget: float = 0.7) -> ExitMLP:
    low, high = observation_bounds(num_classes)
    spec = PolicySpec(hidden=(8, 8), activation="tanh", shift=tuple(((low + high) / 2).tolist()),
                      scale=tuple(((high - low) / 2).tolist()), full_macs=660, num_classes=num_classes,
                      budget=budget, meta={"algorithm": "test"})
    torch.manual_seed(seed)
    mlp = ExitMLP(spec)
    with torch.no_grad():
        for lin in mlp.linears():
            lin.weight.mul_(4)  # make decisions vary across observations
    return mlp.eval()


def test_round_trip_is_pickle_free_and_exact(tmp_path):
    mlp = random_mlp()
    w, j = save_policy(mlp, tmp_path / "pol")
    assert (w.name, j.name) == ("pol.safetensors", "pol.json")
    side = json.loads(j.read_text())
    assert side["format"] == "cafe-ray-exit-policy-v1" and side["hidden"] == [8, 8]
    assert side["features"] == ["max_prob", "margin", "entropy", "depth", "macs_spent", "budget_left"]
    assert len(side["shift"]) == len(side["scale"]) == 6
    x = torch.rand(16, 6)
    for p in (w, j, tmp_path / "pol"):
        assert torch.equal(load_policy_mlp(p)(x), mlp(x))


def test_predict_batch_with_a_learned_policy_matches_env_rollouts(tmp_path):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 3, 4, generator=g) * 2  # (N, m, C)
    labels = torch.randint(0, 4, (64,), generator=g)
    mlp = random_mlp(seed=1)
    save_policy(mlp, tmp_path / "policy")
    pol = build_policy("learned", path=tmp_path / "policy.safetensors")
    pred = predict_batch(sliced_een(3, 4), as_input(logits), pol, HAND_COST)

    env = EarlyExitEnv.from_arrays(logits.numpy(), labels.numpy(), HAND_COST, budget=0.7, cost_weight=0.3)
    exits, macs = [], []
    for i in range(64):
        obs, _ = env.reset(options={"index": i})
        while True:
            a = int(mlp(torch.from_numpy(obs)[None]).argmax(dim=1))
            obs, r, term, _, info = env.step(a)
            if term:
                break
        exits.append(info["exit"])
        macs.append(info["macs"])
    assert pred.exits.tolist() == exits and pred.macs.tolist() == macs
    assert sum(e < 2 for e in exits) > 0  # the policy does exit early sometimes


def test_full_macs_come_from_the_cost_inside_predict_batch(tmp_path):
    save_policy(random_mlp(), tmp_path / "p")
    pol = LearnedPolicy(tmp_path / "p")
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    spent = torch.tensor([330])
    obs_cost = pol.observe(probs, 1, 3, spent, full_macs=3300)
    obs_side = pol.observe(probs, 1, 3, spent)  # sidecar's full_macs = 660
    assert obs_cost[0, 4] == pytest.approx(0.1) and obs_side[0, 4] == pytest.approx(0.5)
    assert obs_side[0, 5] == pytest.approx(0.2)  # budget 0.7 - 0.5


def test_bad_policy_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="NAME.safetensors \\+ NAME.json"):
        build_policy("learned", path=tmp_path / "missing")
    w, j = save_policy(random_mlp(), tmp_path / "p")
    side = json.loads(j.read_text())
    j.write_text(json.dumps({**side, "format": "other"}))
    with pytest.raises(ValueError, match="not a cafe-ray exit policy sidecar"):
        LearnedPolicy(w)
    j.write_text(json.dumps({**side, "features": side["features"][:5]}))
    with pytest.raises(ValueError, match="retrain the policy"):
        LearnedPolicy(w)
    j.write_text(json.dumps({**side, "hidden": [8]}))
    with pytest.raises(ValueError, match="do not match the sidecar's architecture"):
        LearnedPolicy(w)
    j.write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"budget is a fraction of full MACs in \(0, 1\]"):
        LearnedPolicy(w, budget=0)


def test_describe_names_its_provenance(tmp_path):
    save_policy(random_mlp(), tmp_path / "p")
    d = LearnedPolicy(tmp_path / "p.json").describe()
    assert d["policy"] == "learned" and d["trained"] == {"algorithm": "test"} and d["budget"] == 0.7
    assert np.isclose(d["budget"], 0.7)
