"""cafe_ray/EarlyExit-v0: Gymnasium's checker, exact rewards and MACs, seeding, vector envs."""

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from cafe_ray.envs import ENV_ID, MAX_EPISODE_STEPS, EarlyExitEnv
from cafe_ray.inference import ExitTrace
from tests.inference.helpers import (
    HAND_CASCADE,
    HAND_COST,
    HAND_LABELS,
    HAND_LOGITS,
    as_input,
    sliced_een,
)


def hand_env(**kw) -> EarlyExitEnv:
    return EarlyExitEnv.from_arrays(HAND_LOGITS.numpy(), HAND_LABELS.numpy(), HAND_COST, **kw)


def play(env: EarlyExitEnv, index: int, actions: list[int]) -> tuple[list[float], dict]:
    env.reset(seed=0, options={"index": index})
    rewards, info = [], {}
    for a in actions:
        _, r, term, trunc, info = env.step(a)
        rewards.append(r)
        if term or trunc:
            break
    return rewards, info


def test_passes_gymnasium_env_checker():
    env = gym.make(ENV_ID, trace=hand_env().trace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        check_env(env.unwrapped)
    env.close()


def test_registration_sets_the_time_limit_not_the_env():
    env = gym.make(ENV_ID, trace=hand_env().trace)
    assert env.spec.max_episode_steps == MAX_EPISODE_STEPS
    assert isinstance(env, gym.wrappers.TimeLimit) and isinstance(env.unwrapped, EarlyExitEnv)


def test_exact_rewards_and_macs_on_known_logits():
    env = hand_env(cost_weight=0.5)  # full-depth cascade: 660 MACs
    r, info = play(env, 0, [1])  # exit 0 predicts class 0 = label
    assert r == [pytest.approx(1 - 0.5 * 110 / 660)] and info["macs"] == 110 and info["correct"]
    r, info = play(env, 1, [0, 1])  # exit 1 predicts class 1, label 2
    assert r == [0.0, pytest.approx(-0.5 * 330 / 660)] and info["macs"] == 330 and not info["correct"]
    r, info = play(env, 2, [0, 0, 0])  # both actions end the episode at the last exit
    assert r == [0.0, 0.0, pytest.approx(1 - 0.5)] and info["exit"] == 2 and info["macs"] == 660
    r, info = play(env, 0, [0, 0, 1])  # the last exit predicts class 2, label 0
    assert r[-1] == pytest.approx(-0.5) and info["prediction"] == 2


def test_observation_features_are_exact():
    env = hand_env(budget=0.5)
    obs, _ = env.reset(options={"index": 1})
    np.testing.assert_allclose(obs, [1 / 3, 0.0, math.log(3), 0.0, 110 / 660, 0.5 - 110 / 660], atol=1e-6)
    obs, *_ = env.step(0)
    p = torch.tensor([0.0, 3.0, 0.0]).softmax(0).numpy()
    ent = -(p * np.log(p)).sum()
    np.testing.assert_allclose(obs, [p[1], p[1] - p[0], ent, 0.5, 330 / 660, 0.0], atol=1e-6)  # budget spent
    assert env.observation_space.contains(obs)
    assert env.observation_space.high[2] == pytest.approx(math.log(3))


def test_env_from_a_model_matches_env_from_its_arrays():
    trace = ExitTrace.from_model(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS, HAND_COST)
    np.testing.assert_array_equal(trace.exit_macs, HAND_CASCADE)
    np.testing.assert_allclose(EarlyExitEnv(trace=trace).observations, hand_env().observations, atol=1e-7)


def test_reset_draws_only_from_np_random():
    env = hand_env()
    seq = [env.reset(seed=7)[1]["index"]] + [env.reset()[1]["index"] for _ in range(20)]
    again = [env.reset(seed=7)[1]["index"]] + [env.reset()[1]["index"] for _ in range(20)]
    assert seq == again and len(set(seq)) == 3
    state = np.random.get_state()[1].copy()
    torch_state = torch.random.get_rng_state().clone()
    env.reset(seed=1)
    env.step(0)
    assert (np.random.get_state()[1] == state).all() and torch.equal(torch.random.get_rng_state(), torch_state)


def test_guard_rails_say_what_to_do():
    env = hand_env()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="0 .continue. or 1 .exit."):
        env.step(2)
    env.step(1)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(1)
    with pytest.raises(ValueError, match=r"options\['index'\] must be in \[0, 2\]"):
        env.reset(options={"index": 3})
    with pytest.raises(ValueError, match="exactly one of run_dir"):
        EarlyExitEnv()
    with pytest.raises(ValueError, match="cost_weight must be >= 0"):
        hand_env(cost_weight=-1)
    with pytest.raises(ValueError, match=r"budget is a fraction .* \(0, 1\]"):
        hand_env(budget=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        EarlyExitEnv.from_arrays(HAND_LOGITS.numpy(), HAND_LABELS.numpy(), [100, 200, 300][::-1])
    with pytest.raises(ValueError, match="labels must lie in"):
        EarlyExitEnv.from_arrays(HAND_LOGITS.numpy(), np.array([0, 1, 3]), HAND_CASCADE)


def test_ansi_render():
    env = hand_env(render_mode="ansi")
    env.reset(options={"index": 0})
    assert env.render().startswith("sample 0 exit 1/3: max_prob=0.909")


def test_sync_vector_env_steps_and_autoresets():
    trace = hand_env().trace
    venv = gym.vector.SyncVectorEnv([lambda: EarlyExitEnv(trace=trace, cost_weight=0.5) for _ in range(4)])
    obs, _ = venv.reset(seed=3)
    assert obs.shape == (4, 6) and obs.dtype == np.float32
    returns = np.zeros(4)
    episodes = 0
    for _ in range(12):
        obs, rew, term, trunc, _ = venv.step(np.zeros(4, dtype=np.int64))  # always continue: 3 steps
        returns += rew
        episodes += int(term.sum())
        assert venv.single_observation_space.contains(obs[0])
    assert episodes == 12  # 4 envs x (steps 1-3, autoreset on 4, 5-7, reset 8, 9-11) = 3 episodes each
    venv.close()


def test_make_vec_from_registration():
    trace = hand_env().trace
    venv = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="sync", trace=trace)
    obs, _ = venv.reset(seed=0)
    _, rew, term, _, _ = venv.step(np.ones(2, dtype=np.int64))
    assert obs.shape == (2, 6) and term.all()
    venv.close()


def test_env_from_a_run_directory(run_dir):
    env = gym.make(ENV_ID, run_dir=run_dir, client_id=0, split="val", cost_weight=0.2)
    obs, info = env.reset(seed=0)
    u = env.unwrapped
    assert u.trace.num_exits == 3 and u.trace.num_classes == 10
    assert u.trace.full_macs == sum(u.trace.exit_macs[-1:]) and env.observation_space.contains(obs)
    pooled = EarlyExitEnv(run_dir, client_id=None, split="val")
    assert pooled.trace.num_samples > u.trace.num_samples
    check_env(u)
