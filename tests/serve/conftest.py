"""A tiny finished run to serve (digits, 6 clients, FedPer-EE: personal heads, so clients differ)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
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


MAX_BATCH = 8
MAX_BODY = 64 * 1024  # bytes: a small body cap, so the tests can cross it cheaply
SLO_DROP_POINTS = 10.0  # the tiny model's val curve has few points within 1 point of full depth


def flat(text: str) -> str:
    """Whitespace collapsed: rich wraps long lines of CLI output."""
    return " ".join(text.split())


def read_until(proc, done) -> str:
    """A CLI subprocess's output up to and including the first line ``done`` accepts, whitespace
    collapsed (rich wraps long lines)."""
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if done(line):
            break
    return flat("".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def served(ray_session, serve_run_dir):
    """The app on this session's Ray (Serve's proxy on a free port); 2 models per replica so 6
    clients exercise the LRU. Session-wide: Serve starts once for every HTTP test."""
    from ray import serve

    from cafe_ray.serve.app import start

    cfg = ServeConfig(run_dir=str(serve_run_dir), port=free_port(), replica_cpus=0, max_batch=MAX_BATCH,
                      max_models_per_replica=2, batch_wait_ms=5, app_name="cafe-ray-test",
                      max_body_bytes=MAX_BODY, max_accuracy_drop=SLO_DROP_POINTS)
    handle = start(cfg)
    try:
        yield cfg, handle
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def http(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def serve_artifacts(serve_run_dir) -> RunArtifacts:
    return RunArtifacts(serve_run_dir)


@pytest.fixture(scope="session")
def service(serve_run_dir) -> ModelService:
    """The replica's logic in this process, no Ray (max 8 samples per request)."""
    return ModelService(ServeConfig(run_dir=str(serve_run_dir), max_batch=8))
