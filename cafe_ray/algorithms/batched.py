"""Losses of a cohort's batched local step (``engine.vectorize``): C clients' batches at once.

Tensors are laid out (B, C, ...): sample b of client c. Kept apart from
:mod:`cafe_ray.algorithms.training` so that the algorithm interface can name its default
without importing the training loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F


def masked_ce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each client's mean cross-entropy over its real samples: z (B, C, K), y and w (B, C) -> (C,).

    Padding rows (w = 0) are left out with ``where``, not multiplied by 0, so a logit of
    -inf at a padding row's dummy label (a balanced softmax on a class the client never
    saw) cannot turn the sum into NaN."""
    B, C = y.shape
    ce = F.cross_entropy(z.reshape(B * C, -1), y.reshape(-1), reduction="none").view(B, C)
    return torch.where(w > 0, ce, torch.zeros_like(ce)).sum(0) / w.sum(0).clamp_min(1.0)


def cohort_exit_ce(logits: Iterable[torch.Tensor], y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_exit_ce`` for a cohort: per client (C,), exits summed in the same order."""
    total: Any = 0
    for z in logits:
        total = total + masked_ce(z, y, w)
    return total
