"""``cafe_ray.simulate``: the CLI's ``cafe-ray simulate`` as a function that returns a :class:`Run`.

It takes the same path as the CLI: the config is checked before Ray starts (a
:class:`~cafe_ray.config.ConfigError` names the field), the run goes through
:func:`cafe_ray.sim.engine.run_simulation`, and its directory is the same. So the same
config gives the same results from a notebook as from a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cafe_ray.api.run import Run
from cafe_ray.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    deep_copy,
    load_config,
    set_dotted,
)


def resolve(config: str | Path | Mapping[str, Any] | ExperimentConfig,
            overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a YAML path, a mapping or a config, plus dotted-key overrides
    (``{"round.num_rounds": 3}``; values as Python objects, not YAML text)."""
    if isinstance(config, str | Path):
        raw = load_config(config).model_dump(mode="json", exclude_unset=True)
        source = str(config)
    elif isinstance(config, ExperimentConfig):
        raw, source = config.model_dump(mode="json", exclude_unset=True), "<ExperimentConfig>"
    elif isinstance(config, Mapping):
        raw, source = deep_copy(config), "<dict>"
    else:
        raise ConfigError(f"config: expected a YAML path, a dict or an ExperimentConfig, got {type(config).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return build_config(raw, source)


def simulate(config: str | Path | Mapping[str, Any] | ExperimentConfig,
             overrides: Mapping[str, Any] | None = None, address: str | None = None, *,
             show_progress: bool = True, on_round: Callable[[dict[str, Any]], None] | None = None) -> Run:
    """Run a simulation to its last round and return its :class:`Run`.

    ``config``: a YAML path, a dict or an ExperimentConfig; ``overrides``: dotted keys, e.g.
    ``{"round.num_rounds": 3}``; ``address``: a Ray cluster (default: the Ray this process
    is connected to, else a local one, which stays up for the next call and stops when
    Python exits). Raises ConfigError for a bad config (before Ray starts) and
    :class:`~cafe_ray.sim.errors.RunFailed` / ``RunInterrupted`` when a run stops; their
    message says how to resume it. ``on_round(record)`` gets each round's metrics record (a
    dict, as in metrics.jsonl) in this process as the run goes: the hook for a logger.
    """
    from cafe_ray.sim.engine import run_simulation
    from cafe_ray.sim.preflight import preflight

    cfg = resolve(config, overrides)
    report = preflight(cfg, address=address, keep_data=True)
    run_dir, _ = run_simulation(cfg, address=address, show_progress=show_progress, checked=report,
                                on_round=on_round)
    return Run(run_dir)

