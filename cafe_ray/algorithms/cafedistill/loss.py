"""The local objective of CAFEDistill (arXiv:2601.10015), step 8.

    L_i = CE(y, z_m) + sum_{k in S_i} [ CE(y, z_k)
          + lambda * tau^2 * KL( softmax(zbar/tau) || softmax(z_k/tau) ) ]

with zbar = phi(x)^T hbar_i from the client's *current* backbone feature. The
teacher path is detached: hbar_i is frozen and zbar carries no gradient, so
distillation moves the students (their heads and the stages feeding them) and
never the teacher head nor, through zbar, the deeper backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.training import LossFn
from cafe_ray.models.base import EarlyExitNet


@torch.no_grad()
def teacher_logits(phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """zbar = phi(x) hbar_W^T + hbar_b, detached: (B, D) -> (B, C)."""
    return F.linear(phi.detach(), weight.detach(), bias.detach())


def kd_term(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), batch mean; teacher detached."""
    p_teacher = F.softmax(teacher.detach() / tau, dim=1)
    return tau * tau * F.kl_div(F.log_softmax(student / tau, dim=1), p_teacher, reduction="batchmean")


def cafedistill_loss(
    logits: Sequence[torch.Tensor],
    zbar: torch.Tensor,
    y: torch.Tensor,
    students: Sequence[int],
    lam: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, the undivided KD part sum_k tau^2 KL) for one batch.

    logits: every exit's (B, C) logits, the teacher last; students: S_i (0-based).
    """
    total = F.cross_entropy(logits[-1], y)
    kd = logits[-1].new_zeros(())
    for k in students:
        total = total + F.cross_entropy(logits[k], y)
        if lam > 0:
            kd = kd + kd_term(logits[k], zbar, tau)
    return total + lam * kd, kd.detach()


@dataclass
class KDStats:
    """Running sample-weighted mean of the KD term (a client metric)."""

    total: float = 0.0
    samples: int = 0

    def add(self, kd: torch.Tensor, n: int) -> None:
        self.total += float(kd) * n
        self.samples += n

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0


def make_loss_fn(
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor,
    students: Sequence[int],
    lam: float,
    tau: float,
    stats: KDStats | None = None,
) -> LossFn:
    """L_i as a ``local_sgd`` loss; records the KD term into ``stats``."""
    students = tuple(students)

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, phi = model.forward_with_features(x)
        zbar = teacher_logits(phi, teacher_weight, teacher_bias)
        total, kd = cafedistill_loss(logits, zbar, y, students, lam, tau)
        if stats is not None:
            stats.add(kd, int(y.shape[0]))
        return total

    return loss
