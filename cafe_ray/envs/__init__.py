"""Gymnasium environments. ``cafe_ray/EarlyExit-v0`` is registered by ``import cafe_ray`` already
(by entry-point string); this package holds the environment and its training helpers."""

from cafe_ray import ENV_ID
from cafe_ray import ENV_MAX_EPISODE_STEPS as MAX_EPISODE_STEPS
from cafe_ray.envs.early_exit import EarlyExitEnv, cached_trace, load_trace

__all__ = ["ENV_ID", "MAX_EPISODE_STEPS", "EarlyExitEnv", "cached_trace", "load_trace"]
