"""cafe-ray: a Ray-based simulation platform for personalized federated learning
with early-exit networks. Reference algorithm: CAFEDistill (arXiv:2601.10015).

Importing the package registers the Gymnasium environment ``cafe_ray/EarlyExit-v0`` by its
entry-point string: neither torch nor the environment's module is imported until
``gym.make`` builds one.

The Python API, ``cafe_ray.simulate(config, overrides)`` and ``cafe_ray.Run.load(path)``,
lives in :mod:`cafe_ray.api` and is loaded on first use of either name, by name (the
package root stands on the lowest floor and imports no room above it).
"""

from typing import Any

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

ENV_ID = "cafe_ray/EarlyExit-v0"
ENV_ENTRY_POINT = "cafe_ray.envs.early_exit:EarlyExitEnv"
# An episode has at most one step per exit; the limit is a guard above any zoo model's exits.
ENV_MAX_EPISODE_STEPS = 64


def _register_envs() -> None:
    try:
        import gymnasium
    except ImportError:  # gymnasium is a dependency; a stripped install still imports
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point=ENV_ENTRY_POINT, max_episode_steps=ENV_MAX_EPISODE_STEPS)


_register_envs()

_API = ("simulate", "Run")  # cafe_ray.api's names, loaded on first use


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module("cafe_ray.api"), name)
    raise AttributeError(f"module 'cafe_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
