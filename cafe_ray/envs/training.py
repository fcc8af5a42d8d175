"""Train exit policies with RLlib on ``cafe_ray/EarlyExit-v0`` and export them without RLlib.

A recipe (``policies/*.yaml``, :class:`PolicyRecipe`) says which RLlib algorithm (PPO), which
split to learn on (``val``: never trained on by the federated run), the reward's cost weight,
the MLP's size and the training budget. :func:`train_policy` runs RLlib's new API stack
(``PPOConfig().environment(...).env_runners(...).training(...)``) on one client's exit trace or
on every client's, pooled; :func:`export_policy` copies the trained RLModule's actor path (its
actor encoder and pi head: Linear/activation layers) into a plain
:class:`~cafe_ray.inference.learned.ExitMLP`, checks both give the same logits, and saves it as
safetensors + a JSON sidecar. Evaluation and serving then load it with
``build_policy("learned", path=...)``: no RLlib, no pickle.

The policy sees the environment's observation normalised to [-1, 1] (a fixed affine map from
the observation bounds, recorded in the sidecar), so one recipe fits any number of classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cafe_ray.envs.early_exit import EarlyExitEnv, load_trace
from cafe_ray.inference.learned import ACTIVATIONS, ExitMLP, PolicySpec, save_policy
from cafe_ray.inference.trace import ExitTrace

if TYPE_CHECKING:
    from cafe_ray.runs import RunArtifacts

RECIPES_DIR = Path(__file__).resolve().parents[2] / "policies"  # the repo's policies/
DEFAULT_RECIPE = RECIPES_DIR / "ppo_default.yaml"


# ------------------------------------------------------------------ recipe
class PolicyRecipe(BaseModel):
    """How to train one exit policy (a ``policies/*.yaml`` file)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    algorithm: Literal["PPO"] = "PPO"  # RLlib algorithm (new API stack)
    split: Literal["val", "train", "test", "holdout"] = "val"  # split whose exit traces the env replays
    cost_weight: float = Field(0.1, ge=0)  # reward = correct - cost_weight * MACs / full MACs
    budget: float = Field(1.0, gt=0, le=1)  # MAC budget (fraction of full MACs) for the budget_left feature
    hidden: tuple[int, ...] = (32, 32)  # MLP hidden widths (actor encoder of the RLModule)
    activation: Literal["tanh", "relu", "silu", "elu"] = "tanh"  # after each hidden layer
    iterations: int = Field(30, ge=1)  # algo.train() calls
    lr: float = Field(3e-4, gt=0)  # learning rate
    gamma: float = Field(1.0, gt=0, le=1)  # discount; episodes have at most m steps
    lambda_: float = Field(0.95, ge=0, le=1, alias="lambda")  # GAE lambda
    clip_param: float = Field(0.2, gt=0)  # PPO clip
    entropy_coeff: float = Field(0.01, ge=0)  # exploration bonus
    train_batch_size: int = Field(1024, ge=8)  # env steps per iteration
    minibatch_size: int = Field(128, ge=4)  # SGD minibatch
    num_epochs: int = Field(5, ge=1)  # SGD passes per iteration
    num_envs_per_env_runner: int = Field(4, ge=1)  # vectorised envs on the (local) env runner
    num_env_runners: int = Field(0, ge=0)  # 0: sample in the driver process (fits on 2 CPUs)
    seed: int = 0  # RLlib seed (env sampling and initial weights)

    def with_overrides(self, **kw: Any) -> PolicyRecipe:
        """A copy with the non-None keyword values replaced (validated)."""
        data = self.model_dump(by_alias=True)
        data.update({("lambda" if k == "lambda_" else k): v for k, v in kw.items() if v is not None})
        return PolicyRecipe.model_validate(data)


def load_recipe(path: str | Path | None = None) -> PolicyRecipe:
    """Read a recipe YAML (default ``policies/ppo_default.yaml``; built-in defaults if absent)."""
    p = Path(path) if path is not None else DEFAULT_RECIPE
    if not p.is_file():
        if path is None:
            return PolicyRecipe()
        raise FileNotFoundError(f"policy recipe {p} not found; see {RECIPES_DIR} for examples")
    raw = yaml.safe_load(p.read_text()) or {}
    try:
        return PolicyRecipe.model_validate(raw)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"policy recipe {p}: {msgs}") from None


# ------------------------------------------------------------------ env for RLlib
def feature_normalisation(space: gym.spaces.Box) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) mapping the observation bounds onto [-1, 1]."""
    shift = (space.high + space.low) / 2
    scale = (space.high - space.low) / 2
    return shift.astype(np.float32), np.where(scale > 0, scale, 1.0).astype(np.float32)


class NormalisedEarlyExit(gym.ObservationWrapper):
    """``EarlyExitEnv`` built from an RLlib ``env_config``, observations mapped to [-1, 1].

    env_config keys: ``trace`` (an ExitTrace), ``cost_weight``, ``budget``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        env = EarlyExitEnv(trace=config["trace"], cost_weight=config.get("cost_weight", 0.1),
                           budget=config.get("budget", 1.0))
        super().__init__(env)
        self.shift, self.scale = feature_normalisation(env.observation_space)
        n = env.observation_space.shape[0]
        self.observation_space = gym.spaces.Box(-np.ones(n, np.float32), np.ones(n, np.float32), dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.clip((observation - self.shift) / self.scale, -1.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------ training
@dataclass
class TrainResult:
    """A trained, exported policy and its learning curve."""

    weights: Path
    sidecar: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # per iteration
    seconds: float = 0.0


def build_algorithm_config(trace: ExitTrace, recipe: PolicyRecipe) -> Any:
    """The RLlib ``PPOConfig`` of a recipe on one exit trace (RLlib imported here, lazily)."""
    try:
        from ray.rllib.algorithms.ppo import PPOConfig
        from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    except ImportError as err:  # pragma: no cover - rllib is a declared dependency
        raise ImportError("training a policy needs RLlib: pip install 'ray[rllib]'") from err
    return (
        PPOConfig()
        .environment(env=NormalisedEarlyExit,
                     env_config={"trace": trace, "cost_weight": recipe.cost_weight, "budget": recipe.budget})
        .env_runners(num_env_runners=recipe.num_env_runners, num_envs_per_env_runner=recipe.num_envs_per_env_runner,
                     num_cpus_per_env_runner=1)
        .learners(num_learners=0)
        .training(lr=recipe.lr, gamma=recipe.gamma, lambda_=recipe.lambda_, clip_param=recipe.clip_param,
                  entropy_coeff=recipe.entropy_coeff, train_batch_size_per_learner=recipe.train_batch_size,
                  minibatch_size=min(recipe.minibatch_size, recipe.train_batch_size), num_epochs=recipe.num_epochs)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(recipe.hidden),
                                                   fcnet_activation=recipe.activation,
                                                   head_fcnet_hiddens=[], vf_share_layers=False))
        .debugging(seed=recipe.seed)
    )


def _metric(res: dict[str, Any], *keys: str) -> float | None:
    cur: Any = res
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, int | float | np.floating) else None


def train_policy(trace: ExitTrace, recipe: PolicyRecipe, out: str | Path, *, meta: dict[str, Any] | None = None,
                 on_iteration: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``recipe`` on ``trace`` with RLlib and export the policy to ``out`` (a file stem).

    Needs a running Ray (``ray.init``); RLlib samples in this process when
    ``num_env_runners`` is 0.
    """
    t0 = time.perf_counter()
    algo = build_algorithm_config(trace, recipe).build_algo()
    history: list[dict[str, Any]] = []
    try:
        for it in range(1, recipe.iterations + 1):
            res = algo.train()
            rec = {"iteration": it,
                   "episode_return_mean": _metric(res, "env_runners", "episode_return_mean"),
                   "episode_len_mean": _metric(res, "env_runners", "episode_len_mean"),
                   "env_steps": _metric(res, "env_runners", "num_env_steps_sampled_lifetime"),
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            if on_iteration is not None:
                on_iteration(rec)
        module = algo.get_module()
        env = NormalisedEarlyExit({"trace": trace, "cost_weight": recipe.cost_weight, "budget": recipe.budget})
        spec = PolicySpec(hidden=tuple(recipe.hidden), activation=recipe.activation,
                          shift=tuple(float(v) for v in env.shift), scale=tuple(float(v) for v in env.scale),
                          full_macs=trace.full_macs, num_classes=trace.num_classes, budget=recipe.budget,
                          meta={"algorithm": recipe.algorithm, "iterations": recipe.iterations,
                                "cost_weight": recipe.cost_weight, "split": recipe.split,
                                "train_samples": trace.num_samples, "seed": recipe.seed,
                                "final_episode_return_mean": history[-1]["episode_return_mean"],
                                **(meta or {})})
        raw = env.unwrapped.observations  # (N, m, 6): every observation the policy can meet
        probe = raw.reshape(-1, raw.shape[-1])
        mlp = export_policy(module, spec, probe)
    finally:
        algo.stop()
    weights, sidecar = save_policy(mlp, out)
    return TrainResult(weights, sidecar, history, time.perf_counter() - t0)


# ------------------------------------------------------------------ export
def _actor_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The Linear and activation modules of an RLModule's actor path, in order."""
    encoder = getattr(module, "encoder", None)
    pi = getattr(module, "pi", None)
    if encoder is None or pi is None:
        raise TypeError(f"cannot export {type(module).__name__}: expected an RLlib default RLModule with "
                        "`encoder` and `pi` (PPO's DefaultPPOTorchRLModule)")
    actor = getattr(encoder, "actor_encoder", encoder)
    kinds = (torch.nn.Linear, *ACTIVATIONS.values())
    return [m for part in (actor, pi) for m in part.modules() if isinstance(m, kinds)]


def export_policy(module: Any, spec: PolicySpec, probe: np.ndarray) -> ExitMLP:
    """Copy an RLModule's actor weights into an ExitMLP of ``spec``; check equal logits on ``probe``.

    ``probe``: (K, 6) raw environment observations; the RLModule gets them normalised by the spec.
    """
    mlp = ExitMLP(spec)
    layers = _actor_layers(module)
    src = [m for m in layers if isinstance(m, torch.nn.Linear)]
    dst = mlp.linears()
    if [tuple(m.weight.shape) for m in src] != [tuple(m.weight.shape) for m in dst]:
        raise ValueError(f"RLModule actor layers {[tuple(m.weight.shape) for m in src]} do not match the "
                         f"recipe's MLP {[tuple(m.weight.shape) for m in dst]}")
    acts = {type(m) for m in layers if not isinstance(m, torch.nn.Linear)}
    if acts - {ACTIVATIONS[spec.activation]}:
        raise ValueError(f"RLModule uses activations {sorted(a.__name__ for a in acts)}, recipe says {spec.activation}")
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.weight.copy_(s.weight.detach().cpu())
            d.bias.copy_(s.bias.detach().cpu())
        raw = torch.from_numpy(np.array(probe, dtype=np.float32))  # (K, 6), a writable copy
        normalised = (raw - mlp.shift) / mlp.scale  # what the RLModule saw during training
        ref = module.forward_inference({"obs": normalised})["action_dist_inputs"].detach().cpu()  # (K, 2)
        got = mlp(raw)  # the MLP normalises by itself
    if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"exported MLP disagrees with the RLModule (max |diff| "
                           f"{(ref - got).abs().max().item():.2e}); the RLModule layout may have changed")
    return mlp.eval()


# ------------------------------------------------------------------ a run's clients
def train_for_run(run_dir: str | Path | RunArtifacts, recipe: PolicyRecipe, out_dir: str | Path,
                  client: int | None = None,
                  on_iteration: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train one policy on one client's trace, or on every client's pooled (``client=None``).

    Writes ``policy.safetensors``, ``policy.json``, ``recipe.yaml`` and ``train_log.jsonl`` to
    ``out_dir``.
    """
    from cafe_ray.runs import RunArtifacts

    run = run_dir if isinstance(run_dir, RunArtifacts) else RunArtifacts(run_dir)
    trace = load_trace(run, client, recipe.split)  # cached in the run directory after the first pass
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = train_policy(trace, recipe, out / "policy", on_iteration=on_iteration,
                       meta={"run_dir": str(run.run_dir), "run_algorithm": run.cfg.algorithm.name,
                             "clients": "all" if client is None else [client]})
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(by_alias=True, mode="json"), sort_keys=False))
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res.history))
    return res


def train_per_client(run_dir: str | Path | RunArtifacts, recipe: PolicyRecipe, out_dir: str | Path,
                     clients: list[int] | None = None,
                     on_iteration: Callable[[int, dict[str, Any]], None] | None = None) -> dict[int, TrainResult]:
    """One policy per client (each on its own trace), in ``out_dir/client_<id>/``."""
    from cafe_ray.runs import RunArtifacts

    run = run_dir if isinstance(run_dir, RunArtifacts) else RunArtifacts(run_dir)
    out: dict[int, TrainResult] = {}
    for cid in run.client_ids if clients is None else clients:
        cb = None if on_iteration is None else (lambda rec, c=cid: on_iteration(c, rec))
        out[cid] = train_for_run(run, recipe, Path(out_dir) / f"client_{cid}", client=cid, on_iteration=cb)
    return out
