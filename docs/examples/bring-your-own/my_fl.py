"""A plug-in algorithm and a plug-in model, in a module of their own.

Name them in a config as ``my_fl:FedAvgM`` and ``my_fl:mlp_ee``; nothing is
installed and cafe-ray is not edited. The engine ships this file to Ray's workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cafe_ray.algorithms.base import (
    ClientResult,
    RoundContext,
    ServerState,
    global_params,
    with_global,
)
from cafe_ray.algorithms.fedavg import FedAvgEE
from cafe_ray.config import ExperimentConfig
from cafe_ray.models import EarlyExitNet, LastExitHead

MOMENTUM = "momentum/"  # the server state's namespace for the momentum buffer (checkpointed)


class FedAvgM(FedAvgEE):
    """FedAvg with server momentum (Hsu et al., 2019, arXiv:1909.06335).

    The server treats the average update as a gradient: m <- beta*m + (w - avg), w <- w - lr*m.
    ``algorithm.options`` arrive here as keyword arguments.
    """

    def __init__(self, cfg: ExperimentConfig, beta: float = 0.9, server_lr: float = 1.0) -> None:
        super().__init__(cfg)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta}: needs 0 <= beta < 1")
        if server_lr <= 0:
            raise ValueError(f"server_lr={server_lr}: needs > 0")
        self.beta, self.server_lr = float(beta), float(server_lr)

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        if not results:
            return state
        old = global_params(state)
        avg = global_params(super().aggregate(state, results, ctx))
        new, momentum = {}, {}
        for k, w in old.items():
            if not torch.is_floating_point(w):
                new[k] = avg[k]
                continue
            m = self.beta * state.tensors.get(MOMENTUM + k, torch.zeros_like(w)) + (w - avg[k])
            momentum[MOMENTUM + k] = m
            new[k] = w - self.server_lr * m
        out = with_global(state, new)
        out.tensors.update(momentum)
        return out


def mlp_ee(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> EarlyExitNet:
    """A two-exit MLP: exit 1 after one hidden layer, exit 2 (the last) after two."""
    d = math.prod(input_shape)
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(d, 2 * width), nn.ReLU()),
              nn.Sequential(nn.Linear(2 * width, width), nn.ReLU())]
    exits = [nn.Linear(2 * width, num_classes), LastExitHead(nn.Identity(), width, num_classes)]
    return EarlyExitNet(stages, exits, num_classes)


mlp_ee.example_input = ((1, 28, 28), 10)  # what `cafe-ray models` measures it on
