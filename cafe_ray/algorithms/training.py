"""Local SGD shared by the algorithms: one loop, the loss and the trainable set injected.

Determinism: batches are shuffled by a torch.Generator seeded from the client
context, never by a global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cafe_ray.algorithms.base import ClientContext, ClientData
from cafe_ray.algorithms.sgd import SGD
from cafe_ray.config import TrainConfig
from cafe_ray.models.base import EarlyExitNet

# (model, x, y) -> (scalar loss, number of samples in the batch)
LossFn = Callable[[EarlyExitNet, torch.Tensor, torch.Tensor], torch.Tensor]


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` typed as a tensor: the same additions in the same order (0 + t0 + t1 ...),
    so losses stay bit-for-bit what they were."""
    total: Any = 0
    for t in terms:
        total = total + t
    return total


def sum_exit_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default early-exit loss: the sum over exits of cross-entropy (``model`` is an
    EarlyExitNet, possibly wrapped for distributed training)."""
    return tensor_sum(F.cross_entropy(z, y) for z in model(x))


def client_generator(ctx: ClientContext, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((ctx.seed * 1_000_003 + stream) % (2**63 - 1))
    return g


def local_sgd(
    model: EarlyExitNet,
    data: ClientData,
    ctx: ClientContext,
    train: TrainConfig,
    loss_fn: LossFn = sum_exit_ce,
    params: Iterable[torch.nn.Parameter] | None = None,
    stream: int = 0,
) -> tuple[float, int]:
    """Run E local epochs (capped by ``train.max_steps``) of SGD on ``params``.

    Returns (mean training loss, samples processed). Parameters not in ``params``
    get no update (their grads are never applied).
    """
    trainable = list(params) if params is not None else [p for p in model.parameters()]
    trainable = [p for p in trainable if p.requires_grad]
    if not trainable or data.num_train == 0:
        return 0.0, 0
    opt = SGD(trainable, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    gen = client_generator(ctx, stream)
    n = data.num_train
    model.train()
    steps, seen, total = 0, 0, 0.0
    for _ in range(train.local_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, train.batch_size):
            idx = order[start : start + train.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
            if train.max_steps is not None and steps >= train.max_steps:
                return total / max(seen, 1), seen
    return total / max(seen, 1), seen


@torch.no_grad()
def exit_accuracies(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> list[float]:
    """Accuracy of every exit on (x, y); empty inputs give NaN per exit."""
    model.eval()
    correct = torch.zeros(model.num_exits, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        for k, z in enumerate(logits):
            correct[k] += int((z.argmax(dim=1) == yb).sum())
    if len(y) == 0:
        return [float("nan")] * model.num_exits
    return [float(c) / len(y) for c in correct]
