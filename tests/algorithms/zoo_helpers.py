"""Shared bits of the baseline-zoo tests: a digits run through the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cafe_ray.sim.engine import run_simulation
from tests.sim.conftest import tiny_cfg

CHANCE = 0.1  # digits has 10 classes
LEARNS = 0.4  # "well above chance" for 4 rounds of cnn_small width 8 on 6 clients


def run_digits(tmp_path: Path, name: str, *sets: str) -> dict[str, Any]:
    """4 rounds, all 6 clients, sequential executor through the real engine; the run summary."""
    cfg = tiny_cfg(tmp_path, f"algorithm.name={name}", "round.num_rounds=4", "round.fraction=1.0", *sets,
                   executor="sequential")
    _, summary = run_simulation(cfg, show_progress=False)
    return summary
