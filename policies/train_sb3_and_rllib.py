"""Train an exit policy on ``cafe_ray/EarlyExit-v0`` with stable-baselines3 and with RLlib, export
both to the library's policy format, and evaluate both with ``cafe-ray policy compare``.

    pip install -e '.[rl]'          # stable-baselines3 (optional extra; RLlib comes with ray)
    python policies/train_sb3_and_rllib.py runs/quickstart-<ts> --out runs/quickstart-<ts>/policies

The environment is the registered one (``import cafe_ray`` registers it); stable-baselines3's
``make_vec_env`` builds 8 copies, which share one pass of the client models through the run
directory's exit-output cache. The SB3 PPO MLP (tanh, 2x64, raw observations) is copied layer by
layer into :class:`~cafe_ray.inference.learned.ExitMLP`, so the exported ``policy.safetensors``
runs in ``cafe-ray serve --learned`` and ``cafe-ray policy compare`` without SB3 installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cafe_ray
from cafe_ray.envs import EarlyExitEnv
from cafe_ray.envs.training import load_recipe, train_for_run
from cafe_ray.inference.learned import ExitMLP, PolicySpec, save_policy
from cafe_ray.inference.observation import OBS_FEATURES


def sb3_to_exit_mlp(model: Any, env: EarlyExitEnv, meta: dict) -> ExitMLP:  # model: an SB3 PPO
    """Copy an SB3 ``MlpPolicy`` (shared flatten extractor, policy MLP, action head) into an ExitMLP."""
    pol = model.policy
    linears = [m for m in pol.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    acts = {type(m).__name__.lower() for m in pol.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)}
    if acts != {"tanh"}:
        raise ValueError(f"export supports the tanh MlpPolicy, got activations {acts}")
    n = len(OBS_FEATURES)
    spec = PolicySpec(hidden=tuple(lin.out_features for lin in linears), activation="tanh", shift=(0.0,) * n,
                      scale=(1.0,) * n, full_macs=int(env.trace.full_macs), num_classes=env.trace.num_classes,
                      budget=env.budget, meta=meta)
    mlp = ExitMLP(spec)
    with torch.no_grad():
        for dst, src in zip(mlp.linears(), [*linears, pol.action_net], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    probe = env.observations.reshape(-1, n)[:512]  # the exported MLP must act like SB3's deterministic policy
    want, _ = model.predict(probe, deterministic=True)
    got = mlp(torch.from_numpy(probe.copy())).argmax(dim=1).numpy()
    if not np.array_equal(got, want):
        raise RuntimeError(f"exported policy disagrees with SB3 on {(got != want).sum()} of {len(probe)} observations")
    return mlp


def train_sb3(run_dir: Path, out: Path, timesteps: int, cost_weight: float, seed: int) -> Path:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    kwargs = {"run_dir": str(run_dir), "client_id": None, "split": "val", "cost_weight": cost_weight}
    vec = make_vec_env(cafe_ray.ENV_ID, n_envs=8, seed=seed, env_kwargs=kwargs)
    model = PPO("MlpPolicy", vec, gamma=1.0, gae_lambda=0.95, n_steps=256, batch_size=256, learning_rate=3e-4,
                ent_coef=0.01, seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    vec.close()
    env = EarlyExitEnv(**kwargs)
    meta = {"algorithm": "stable-baselines3 PPO", "timesteps": timesteps, "cost_weight": cost_weight,
            "run_dir": str(run_dir), "clients": "all", "seconds": round(time.perf_counter() - t0, 1)}
    dest = out / "sb3_ppo"
    save_policy(sb3_to_exit_mlp(model, env, meta), dest / "policy")
    return dest


def train_rllib(run_dir: Path, out: Path, iterations: int, cost_weight: float, seed: int) -> Path:
    recipe = load_recipe().model_copy(update={"iterations": iterations, "cost_weight": cost_weight, "seed": seed})
    dest = out / "rllib_ppo"
    train_for_run(run_dir, recipe, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/policies")
    ap.add_argument("--timesteps", type=int, default=50_000, help="SB3 environment steps")
    ap.add_argument("--iterations", type=int, default=30, help="RLlib training iterations")
    ap.add_argument("--cost-weight", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["sb3", "rllib"], default=None)
    args = ap.parse_args()
    out = args.out or args.run_dir / "policies"
    dests = []
    if args.only in (None, "sb3"):
        dests.append(train_sb3(args.run_dir, out, args.timesteps, args.cost_weight, args.seed))
    if args.only in (None, "rllib"):
        dests.append(train_rllib(args.run_dir, out, args.iterations, args.cost_weight, args.seed))
    cli = str(Path(sys.executable).parent / "cafe-ray")
    for d in dests:
        print(f"\n== {d.name}: cafe-ray policy compare {args.run_dir} --policy {d}", flush=True)
        subprocess.run([cli, "policy", "compare", str(args.run_dir), "--policy", str(d)], check=True)


if __name__ == "__main__":
    main()
