"""RLlib training on cafe_ray/EarlyExit-v0, export to a plain MLP, use without RLlib."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.envs.training import (
    DEFAULT_RECIPE,
    NormalisedEarlyExit,
    PolicyRecipe,
    export_policy,
    feature_normalisation,
    load_recipe,
)
from cafe_ray.inference import ExitMLP, PolicySpec
from cafe_ray.inference.observation import observation_bounds
from tests.inference.helpers import HAND_COST, HAND_LABELS, HAND_LOGITS

REPO = Path(__file__).resolve().parents[2]


def test_default_recipe_file_is_valid_and_overridable():
    r = load_recipe()
    assert DEFAULT_RECIPE.is_file() and r == load_recipe(DEFAULT_RECIPE) and r.algorithm == "PPO"
    assert r.num_env_runners == 0 and r.split == "val"
    r2 = r.with_overrides(cost_weight=0.05, iterations=None)
    assert r2.cost_weight == 0.05 and r2.iterations == r.iterations
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        r.with_overrides(cost_weight=-1)


def test_recipe_errors_name_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("algorithm: PPO\nlr_typo: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: lr_typo: Extra inputs are not permitted"):
        load_recipe(p)
    with pytest.raises(FileNotFoundError, match="policy recipe .*nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_normalised_env_maps_observations_into_unit_box():
    from cafe_ray.inference import ExitTrace

    trace = ExitTrace(HAND_LOGITS.numpy(), HAND_LABELS.numpy(), HAND_COST.cascade)
    env = NormalisedEarlyExit({"trace": trace, "cost_weight": 0.1})
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and env.observation_space.low.min() == -1
    shift, scale = feature_normalisation(env.unwrapped.observation_space)
    np.testing.assert_allclose(shift + scale, env.unwrapped.observation_space.high, rtol=1e-6)


class _FakeRLModule(nn.Module):
    """The layout of RLlib's DefaultPPOTorchRLModule actor path: encoder.actor_encoder + pi."""

    def __init__(self, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.actor_encoder = nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 8), act())
        self.encoder.critic_encoder = nn.Sequential(nn.Linear(6, 8), act())
        self.pi = nn.Sequential(nn.Linear(8, 2))

    def forward_inference(self, batch):
        return {"action_dist_inputs": self.pi(self.encoder.actor_encoder(batch["obs"]))}


def _spec(hidden=(8, 8), activation="tanh") -> PolicySpec:
    low, high = observation_bounds(3)
    return PolicySpec(hidden=hidden, activation=activation, shift=tuple(((low + high) / 2).tolist()),
                      scale=tuple(((high - low) / 2).tolist()), full_macs=660, num_classes=3)


def test_export_copies_the_actor_path_and_checks_it():
    torch.manual_seed(0)
    module = _FakeRLModule()
    probe = np.random.default_rng(0).uniform(0, 1, (32, 6)).astype(np.float32)
    mlp = export_policy(module, _spec(), probe)
    assert isinstance(mlp, ExitMLP)
    x = torch.from_numpy(probe)
    ref = module.forward_inference({"obs": (x - mlp.shift) / mlp.scale})["action_dist_inputs"]
    torch.testing.assert_close(mlp(x), ref)
    with pytest.raises(ValueError, match="do not match the recipe's MLP"):
        export_policy(module, _spec(hidden=(16, 8)), probe)
    with pytest.raises(ValueError, match="recipe says relu"):
        export_policy(module, _spec(activation="relu"), probe)
    with pytest.raises(TypeError, match="expected an RLlib default RLModule"):
        export_policy(nn.Linear(6, 2), _spec(), probe)


@pytest.mark.usefixtures("ray_session")
def test_short_ppo_training_end_to_end_and_the_export_runs_without_rllib(run_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"iterations": 3, "train_batch_size": 64, "minibatch_size": 32,
                                      "num_epochs": 1, "num_envs_per_env_runner": 1, "cost_weight": 0.3}))
    out = tmp_path / "pol"
    res = CliRunner().invoke(app, ["policy", "train", str(run_dir), "--client", "0", "--recipe", str(recipe),
                                   "--iterations", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    side = json.loads((out / "policy.json").read_text())
    assert side["meta"]["algorithm"] == "PPO" and side["meta"]["iterations"] == 2
    assert side["meta"]["clients"] == [0] and side["meta"]["cost_weight"] == 0.3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["iterations"] == 2
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["split"] == "holdout" and [c["client"] for c in cmp["clients"]] == [0]
    assert set(cmp["pooled"]) == {"full", "learned", "threshold 0.6", "threshold @ learned MACs",
                                  "budget @ learned MACs"}
    assert cmp["pooled"]["threshold @ learned MACs"]["mean_macs"] <= cmp["pooled"]["learned"]["mean_macs"] + 1e-9

    # a fresh interpreter: the exported policy serves through predict_batch with no RLlib import
    code = textwrap.dedent(f"""
        import sys
        from cafe_ray.runs import RunArtifacts
        from cafe_ray.inference import build_policy, predict_batch
        art = RunArtifacts({str(run_dir)!r})
        x, y = art.client_data(0, "holdout")
        pol = build_policy("learned", path={str(out / "policy.safetensors")!r})
        p = predict_batch(art.client_model(0), x, pol, art.exit_cost)
        assert p.macs.shape[0] == x.shape[0] > 0
        assert set(p.macs.tolist()) <= set(art.exit_cost.cascade), p.macs
        assert not [m for m in sys.modules if m.startswith("ray.rllib")], "RLlib was imported"
        print("ok", len(x))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


def test_cli_compare_reports_a_missing_policy(run_dir, tmp_path):
    res = CliRunner().invoke(app, ["policy", "compare", str(run_dir), "--policy", str(tmp_path / "none")])
    assert res.exit_code == 2 and "not found" in res.output


def test_recipe_model_is_frozen():
    with pytest.raises(Exception, match="frozen"):
        PolicyRecipe().cost_weight = 1.0  # type: ignore[misc]  # the point: assigning must fail
