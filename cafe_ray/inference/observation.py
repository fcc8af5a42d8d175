"""The exit-decision observation, shared by the gym environment and learned policies.

One function builds it, so that what a policy was trained on (``cafe_ray/EarlyExit-v0``)
is exactly what it sees at inference (:class:`~cafe_ray.inference.learned.LearnedPolicy`
inside :func:`~cafe_ray.inference.predict_batch`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

OBS_FEATURES: tuple[str, ...] = ("max_prob", "margin", "entropy", "depth", "macs_spent", "budget_left")


def observation_bounds(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 (6,) of the observation: entropy is at most log(num_classes) nats."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    low = np.zeros(len(OBS_FEATURES), dtype=np.float32)
    high = np.ones(len(OBS_FEATURES), dtype=np.float32)
    high[2] = np.float32(math.log(num_classes))
    return low, high


def exit_observation(confidence: torch.Tensor, k: int, num_exits: int, macs_spent: torch.Tensor,
                     full_macs: int, budget: float, num_classes: int) -> torch.Tensor:
    """(B, 6) float32 observation at exit ``k`` (0-based).

    confidence: (B, 3) from :func:`~cafe_ray.inference.confidence_features` (max prob, margin,
    entropy); macs_spent: (B,) MACs spent so far (cascade through exit k); budget: the MAC budget
    as a fraction of ``full_macs``. Features: the three confidences, depth k/(m-1), MACs spent /
    full MACs, and budget left max(budget - spent/full, 0), clipped to :func:`observation_bounds`.
    """
    b = confidence.shape[0]
    spent = macs_spent.to(torch.float64) / float(full_macs)  # (B,)
    obs = torch.empty(b, len(OBS_FEATURES), dtype=torch.float32)
    obs[:, :3] = confidence.to(torch.float32)
    obs[:, 3] = k / (num_exits - 1)
    obs[:, 4] = spent.to(torch.float32)
    obs[:, 5] = (budget - spent).clamp_min(0.0).to(torch.float32)
    low, high = observation_bounds(num_classes)
    return obs.clamp(torch.from_numpy(low), torch.from_numpy(high))
