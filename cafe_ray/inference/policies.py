"""Exit policies: decide, per sample, whether to stop at the current exit.

A policy sees the current exit's softmax probabilities and where it is (exit k,
MACs spent) and answers a boolean per sample. Policies live outside the model:
any trained early-exit network works with any policy. New policies register
with :func:`register_policy` and are built by name with :func:`build_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cafe_ray.models import ExitCost


def confidence_features(probs: torch.Tensor) -> torch.Tensor:
    """(B, C) probabilities -> (B, 3): max probability, top-1 minus top-2 margin, entropy."""
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values  # (B, 2)
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    entropy = -(probs.clamp_min(1e-12).log() * probs).sum(dim=1)
    return torch.stack([top2[:, 0], margin, entropy], dim=1)


class ExitPolicy(ABC):
    name: str = ""
    combines: bool = False  # True: predict_batch answers with self.combine(log-probs of exits 0..k, k)

    @abstractmethod
    def should_exit(self, probs: torch.Tensor, k: int, num_exits: int, macs_spent: torch.Tensor) -> torch.Tensor:
        """Bool (B,) mask: stop at exit ``k`` (0-based). The last exit always stops."""

    def decide(self, probs: torch.Tensor, k: int, num_exits: int, macs_spent: torch.Tensor,
               cost: ExitCost | None = None) -> torch.Tensor:
        """What :func:`~cafe_ray.inference.predict_batch` calls: ``should_exit`` plus the model's
        per-exit cost, for policies whose features depend on it (a learned policy normalises
        MACs by the full-depth cost). Policies that ignore the cost need not override it."""
        return self.should_exit(probs, k, num_exits, macs_spent)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}


class FullDepth(ExitPolicy):
    name = "full"

    def should_exit(self, probs, k, num_exits, macs_spent):
        return torch.full((probs.shape[0],), k == num_exits - 1, dtype=torch.bool)


class Threshold(ExitPolicy):
    """Stop at the first exit whose max softmax probability reaches ``threshold``."""

    name = "threshold"

    def __init__(self, threshold: float = 0.6) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def should_exit(self, probs, k, num_exits, macs_spent):
        return probs.max(dim=1).values >= self.threshold

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "threshold": self.threshold}


class EntropyThreshold(ExitPolicy):
    """Stop when the prediction entropy falls to ``max_entropy`` (nats) or below."""

    name = "entropy"

    def __init__(self, max_entropy: float = 0.5) -> None:
        if max_entropy < 0:
            raise ValueError(f"max_entropy must be >= 0, got {max_entropy}")
        self.max_entropy = float(max_entropy)

    def should_exit(self, probs, k, num_exits, macs_spent):
        return confidence_features(probs)[:, 2] <= self.max_entropy

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "max_entropy": self.max_entropy}


_POLICIES: dict[str, Callable[..., ExitPolicy]] = {
    "full": FullDepth,
    "threshold": Threshold,
    "entropy": EntropyThreshold,
}


def register_policy(name: str, factory: Callable[..., ExitPolicy]) -> None:
    """Make ``build_policy(name, **kwargs)`` call ``factory(**kwargs)``.

    Besides the three above, :mod:`cafe_ray.inference` registers ``"budget"``
    (:class:`~cafe_ray.inference.budget.BudgetThreshold`) and ``"learned"``
    (:class:`~cafe_ray.inference.learned.LearnedPolicy`).
    """
    _POLICIES[name] = factory


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def build_policy(name: str, **kwargs: Any) -> ExitPolicy:
    if name not in _POLICIES:
        raise ValueError(f"policy: unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _POLICIES[name](**kwargs)
