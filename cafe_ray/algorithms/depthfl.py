"""DepthFL: depth-limited sub-models with mutual self-distillation among their exits.

Kim, Yu, Kim, Moon, "DepthFL: Depthwise Federated Learning for Heterogeneous
Clients", ICLR 2023 (OpenReview pf8RIZTMU58). Reference:
Flower's baselines/depthfl.

As defined in docs/specification.md (Baselines): client i trains the first
k = ``max_depth`` stages of the EEN and their exits (k from its device profile,
``ClientContext.max_depth``; None = all m), on
    sum_{e<k} CE(y, z_e) + w(t) / (k-1) * sum_{e<k} sum_{e'<k, e'!=e}
        T^2 KL(softmax(z_e'/T) || softmax(z_e/T)),
the mutual self-distillation among the exits it has (each exit learns from the
others' detached predictions, as deep mutual learning; none when k = 1), with
w(t) = ``depthfl.kd_weight`` (ramped up as exp(-5 (1 - t/R)^2) over R =
``rampup_rounds`` rounds, the reference's schedule, if R > 0) and T =
``depthfl.temperature`` (1 in the reference). Layers beyond k are neither
trained nor uploaded; the server averages each layer over the clients that hold
it (sample-weighted; :mod:`cafe_ray.algorithms.submodel`). The reference's
FedDyn regulariser is not part of the project's definition. Evaluation runs the
global model on every client (each exit separately).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.base import ClientContext, ClientData, register
from cafe_ray.algorithms.cafedistill.loss import kd_term
from cafe_ray.algorithms.submodel import SubModelFL, depth_of
from cafe_ray.algorithms.training import LossFn, tensor_sum
from cafe_ray.models.base import EarlyExitNet


def mutual_distillation_loss(
    logits: Sequence[torch.Tensor], y: torch.Tensor, kd_weight: float, temperature: float
) -> torch.Tensor:
    """sum_e CE(y, z_e) + kd_weight / (k-1) * sum_{e != e'} tau^2 KL(p_e' || p_e), teachers detached."""
    k = len(logits)
    ce = tensor_sum(F.cross_entropy(z, y) for z in logits)
    if k < 2 or kd_weight == 0:
        return ce
    kd = tensor_sum(kd_term(logits[e], logits[o], temperature) for e in range(k) for o in range(k) if o != e)
    return ce + kd_weight * kd / (k - 1)


def rampup(t: int, rounds: int) -> float:
    """exp(-5 (1 - t/R)^2) for t < R, 1 afterwards (and always 1 when R = 0)."""
    if rounds <= 0:
        return 1.0
    phase = 1.0 - min(t, rounds) / rounds
    return math.exp(-5.0 * phase * phase)


@register
class DepthFL(SubModelFL):
    """DepthFL (ICLR 2023): depth-k prefixes, mutual self-distillation, layer-wise averaging."""

    name = "depthfl"

    def submodel(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[EarlyExitNet, int, int]:
        return model, self.cfg.model.width, depth_of(ctx.max_depth, model.num_exits)

    def loss_fn(self, depth: int, ctx: ClientContext) -> LossFn:
        hp = self.cfg.algorithm.depthfl
        weight = hp.kd_weight * rampup(ctx.round, hp.rampup_rounds)

        def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return mutual_distillation_loss(model.forward_until(x, depth - 1), y, weight, hp.temperature)

        return loss
