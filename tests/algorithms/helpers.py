"""In-process round loop and tiny federated data for algorithm tests (no Ray)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cafe_ray.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientResult,
    Params,
    RoundContext,
    ServerState,
)
from cafe_ray.algorithms.training import exit_accuracies
from cafe_ray.config import ExperimentConfig, build_config
from cafe_ray.models.base import EarlyExitNet, LastExitHead


def make_cfg(name: str, train: dict[str, Any] | None = None, **algorithm: Any) -> ExperimentConfig:
    """A config for algorithm ``name``; ``algorithm`` holds its sections (e.g. cafedistill={...})."""
    tr = {"batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    tr.update(train or {})
    return build_config({"seed": 0, "algorithm": {"name": name, **algorithm}, "train": tr})


def make_clients(
    num_clients: int = 4, n_train: int = 48, n_test: int = 48, in_dim: int = 8, num_classes: int = 4, seed: int = 0
) -> dict[int, ClientData]:
    """Gaussian class clusters; client i mostly sees classes i and i+1 (label skew)."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(num_classes, in_dim, generator=g)

    def draw(cid: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.tensor([cid % num_classes, (cid + 1) % num_classes])
        y = classes[torch.randint(0, 2, (n,), generator=g)]
        x = means[y] + 0.5 * torch.randn(n, in_dim, generator=g)
        return x, y

    out: dict[int, ClientData] = {}
    for cid in range(num_clients):
        xtr, ytr = draw(cid, n_train)
        xte, yte = draw(cid, n_test)
        out[cid] = ClientData(xtr, ytr, xte, yte)
    return out


def client_ctx(cid: int, t: int, T: int, seed: int = 0) -> ClientContext:
    return ClientContext(client_id=cid, round=t, num_rounds=T, seed=seed * 10_007 + t * 101 + cid)


def round_ctx(t: int, T: int, participants: tuple[int, ...], seed: int = 0) -> RoundContext:
    return RoundContext(round=t, num_rounds=T, seed=seed * 7919 + t, participants=participants)


def run_rounds(
    alg: Algorithm,
    init_model: EarlyExitNet,
    data: dict[int, ClientData],
    num_rounds: int,
    participants: list[tuple[int, ...]] | None = None,
) -> tuple[ServerState, dict[int, Params]]:
    """The round loop, sequentially in-process; each client starts from a fresh copy of the init."""
    state = alg.init_server_state(copy.deepcopy(init_model))
    personal: dict[int, Params] = {}
    for t in range(num_rounds):
        parts = participants[t] if participants else tuple(sorted(data))
        rctx = round_ctx(t, num_rounds, parts)
        payloads = alg.server_payloads(state, rctx)
        results = []
        for cid in parts:
            out = alg.client_update(
                copy.deepcopy(init_model), payloads[cid], personal.get(cid), data[cid], client_ctx(cid, t, num_rounds)
            )
            if out.personal is not None:
                personal[cid] = out.personal
            results.append(ClientResult(cid, out))
        state = alg.aggregate(state, results, rctx)
    return state, personal


def evaluate(
    alg: Algorithm, init_model: EarlyExitNet, state: ServerState, personal: dict[int, Params], data: dict[int, ClientData]
) -> list[float]:
    """Per-exit test accuracy pooled over the clients (each with its own heads)."""
    correct = torch.zeros(init_model.num_exits)
    total = 0
    payload = alg.eval_payload(state)
    for cid, d in data.items():
        model = copy.deepcopy(init_model)
        alg.load_for_eval(model, payload, personal.get(cid), d, client_ctx(cid, 0, 1))
        accs = exit_accuracies(model, d.x_test, d.y_test)
        correct += torch.tensor(accs) * len(d.y_test)
        total += len(d.y_test)
    return (correct / total).tolist()


def make_conv_een(num_classes: int = 5, width: int = 4, m: int = 3) -> EarlyExitNet:
    """A small CNN early-exit net with BatchNorm (buffers) and conv student heads."""
    torch.manual_seed(0)
    stages: list[nn.Module] = []
    c_in = 1
    for _ in range(m):
        stages.append(nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()))
        c_in = width
    exits: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        for _ in range(m - 1)
    ]
    exits.append(LastExitHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), width, num_classes))
    return EarlyExitNet(stages, exits, num_classes)
