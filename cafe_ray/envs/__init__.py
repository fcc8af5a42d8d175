"""Gymnasium environments; importing this package registers ``cafe_ray/EarlyExit-v0``."""

import gymnasium

from cafe_ray.envs.early_exit import EarlyExitEnv

ENV_ID = "cafe_ray/EarlyExit-v0"
# An episode has at most one step per exit; the limit is a guard above any zoo model's exits.
MAX_EPISODE_STEPS = 64

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="cafe_ray.envs.early_exit:EarlyExitEnv",
                       max_episode_steps=MAX_EPISODE_STEPS)

__all__ = ["ENV_ID", "MAX_EPISODE_STEPS", "EarlyExitEnv"]
