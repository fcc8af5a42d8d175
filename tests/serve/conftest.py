"""A tiny finished run to serve (digits, 6 clients, FedPer-EE: personal heads, so clients differ)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cafe_ray.runs import RunArtifacts
from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.service import ModelService


@pytest.fixture(scope="session")
def serve_run_dir(tmp_path_factory) -> Path:
    from cafe_ray.sim.engine import run_simulation
    from tests.sim.conftest import tiny_cfg

    cfg = tiny_cfg(tmp_path_factory.mktemp("serve-run"), "algorithm.name=fedper_ee", "round.num_rounds=3",
                   executor="sequential")
    run_dir, _ = run_simulation(cfg, show_progress=False)
    return Path(run_dir)


@pytest.fixture(scope="session")
def serve_artifacts(serve_run_dir) -> RunArtifacts:
    return RunArtifacts(serve_run_dir)


@pytest.fixture(scope="session")
def service(serve_run_dir) -> ModelService:
    """The replica's logic in this process, no Ray (max 8 samples per request)."""
    return ModelService(ServeConfig(run_dir=str(serve_run_dir), max_batch=8))
