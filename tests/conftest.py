"""Shared fixtures: one local Ray instance per session, a tiny early-exit model."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cafe_ray.models.base import EarlyExitNet, LastExitHead

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The tests' models and policy fits are tiny: one thread runs them 2-4x faster than several
# competing for the cores (as the simulation's own runners and Ray workers already do).
torch.set_num_threads(1)


def make_tiny_een(in_dim: int = 8, hidden: int = 16, num_classes: int = 4, m: int = 3, seed: int = 0) -> EarlyExitNet:
    """An m-exit MLP early-exit net on flat inputs: small enough to reason about."""
    torch.manual_seed(seed)
    stages: list[nn.Module] = [nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())]
    stages += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(m - 1)]
    exits: list[nn.Module] = [nn.Linear(hidden, num_classes) for _ in range(m - 1)]
    exits.append(LastExitHead(nn.Identity(), hidden, num_classes))
    return EarlyExitNet(stages, exits, num_classes)


@pytest.fixture
def tiny_een() -> EarlyExitNet:
    return make_tiny_een()


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session (2 CPUs and one GPU that Ray
    assigns by id, with no CUDA behind it: GPU classes run with engine.gpu_standin=cpu)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, resources={"cafe_test": 4})
    yield ray
    ray.shutdown()
