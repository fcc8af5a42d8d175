"""EarlyExit-v0 for third-party RL code: registered by `import cafe_ray`, rgb_array rendering,
clear client-id errors, one model pass for N environments, stable-baselines3's helpers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

from cafe_ray import ENV_ID
from cafe_ray.envs import EarlyExitEnv
from cafe_ray.inference.trace import ExitTrace
from cafe_ray.runs import RunArtifacts, rundir


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A copy of the tiny run with no exit-output cache yet."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(rundir.EXIT_TRACES))
    return dst


@pytest.fixture
def model_passes(monkeypatch):
    """Counts forward passes over a split (ExitTrace.from_model runs every exit of a client model)."""
    calls: list[int] = []
    real = ExitTrace.from_model.__func__

    def counted(cls, model, x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return real(cls, model, x, *args, **kwargs)

    monkeypatch.setattr(ExitTrace, "from_model", classmethod(counted))
    return calls


def test_import_cafe_ray_registers_the_env_without_torch(run_dir):
    code = ("import sys, cafe_ray, gymnasium as gym\n"
            "assert 'torch' not in sys.modules and 'cafe_ray.envs' not in sys.modules, 'import cafe_ray is heavy'\n"
            f"env = gym.make({ENV_ID!r}, run_dir={str(run_dir)!r}, client_id=0)\n"
            "obs, info = env.reset(seed=0)\n"
            "print(type(env.unwrapped).__name__, obs.shape, env.spec.max_episode_steps)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EarlyExitEnv", "(6,)", "64"]


def test_unknown_client_id_lists_the_valid_ids(run_dir):
    with pytest.raises(ValueError, match=r"client_id=99: run .* has no such client; valid ids are 0\.\.5 "
                                         r"\(6 clients\), or None"):
        gym.make(ENV_ID, run_dir=run_dir, client_id=99)
    with pytest.raises(ValueError, match="valid ids are"):
        EarlyExitEnv(run_dir=run_dir, client_id="1")


def test_building_8_envs_runs_the_model_once(fresh_run, model_passes):
    envs = gym.make_vec(ENV_ID, num_envs=8, vectorization_mode="sync", run_dir=fresh_run, client_id=2)
    assert len(model_passes) == 1  # the first env computed and cached; the other 7 read the cache
    run = RunArtifacts(fresh_run)
    path = rundir.exit_trace_path(fresh_run, run.round, 2, "val")
    assert path.is_file()
    direct = ExitTrace.from_run(run, 2, "val")
    cached = envs.envs[7].unwrapped.trace
    np.testing.assert_array_equal(cached.logits, direct.logits)
    np.testing.assert_array_equal(cached.labels, direct.labels)
    np.testing.assert_array_equal(cached.exit_macs, direct.exit_macs)
    envs.close()
    model_passes.clear()
    gym.make(ENV_ID, run_dir=fresh_run, client_id=None)  # pooled: client 2 is cached, 5 others are not
    assert len(model_passes) == 5
    gym.make(ENV_ID, run_dir=fresh_run, client_id=None)
    assert len(model_passes) == 5


def test_a_corrupt_cache_file_is_recomputed(fresh_run, model_passes):
    run = RunArtifacts(fresh_run)
    path = rundir.exit_trace_path(fresh_run, run.round, 0, "val")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    env = gym.make(ENV_ID, run_dir=fresh_run, client_id=0)
    assert len(model_passes) == 1 and env.unwrapped.trace.num_samples > 0
    assert rundir.read_exit_trace(path) is not None  # rewritten


def test_rgb_array_render(run_dir):
    env = gym.make(ENV_ID, run_dir=run_dir, client_id=0, render_mode="rgb_array")
    env.reset(seed=0, options={"index": 0})
    frame = env.render()
    m = env.unwrapped.trace.num_exits
    assert frame.shape == (64, 16 * m, 3) and frame.dtype == np.uint8
    _, _, term, _, info = env.step(0)
    _, _, term, _, info = env.step(1)
    assert term
    done = env.render()
    k = info["exit"]
    bar = done[-1, k * 16 + 8]
    assert tuple(bar) == ((46, 160, 67) if info["correct"] else (214, 39, 40))
    with pytest.raises(ValueError, match="render_mode"):
        EarlyExitEnv(run_dir=run_dir, client_id=0, render_mode="video")


def test_gymnasium_checker_with_rgb_array(run_dir):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(ENV_ID, run_dir=run_dir, client_id=1, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_stable_baselines3_make_vec_env_check_env_and_a_short_ppo(run_dir):
    sb3 = pytest.importorskip("stable_baselines3", reason="install the rl extra: pip install -e '.[rl]'")
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.env_util import make_vec_env

    check_env(EarlyExitEnv(run_dir=run_dir, client_id=0), warn=True)
    vec = make_vec_env(ENV_ID, n_envs=4, seed=0, env_kwargs={"run_dir": str(run_dir), "client_id": 0})
    assert vec.num_envs == 4 and vec.render_mode == "rgb_array"
    vec.reset()
    assert vec.render().ndim == 3  # the tiled frames of the 4 envs
    model = sb3.PPO("MlpPolicy", vec, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=64)
    action, _ = model.predict(vec.reset(), deterministic=True)
    assert action.shape == (4,) and set(action.tolist()) <= {0, 1}
    vec.close()


def test_the_sb3_example_exports_a_policy_the_library_runs(run_dir, tmp_path):
    """policies/train_sb3_and_rllib.py: a short SB3 run exports an ExitMLP that acts like SB3."""
    pytest.importorskip("stable_baselines3", reason="install the rl extra: pip install -e '.[rl]'")
    import importlib.util
    from pathlib import Path

    from cafe_ray.inference import build_policy

    script = Path(__file__).resolve().parents[2] / "policies" / "train_sb3_and_rllib.py"
    spec = importlib.util.spec_from_file_location("train_sb3_and_rllib", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dest = mod.train_sb3(run_dir, tmp_path, timesteps=512, cost_weight=0.1, seed=0)  # raises if SB3 disagrees
    policy = build_policy("learned", path=dest / "policy.safetensors")
    assert policy.describe()["trained"]["algorithm"] == "stable-baselines3 PPO"
