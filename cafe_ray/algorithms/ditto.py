"""Ditto-EE: a global early-exit network by FedAvg plus a personal one pulled toward it.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021 (arXiv:2012.04221).

Early-exit version (docs/specification.md, Baselines). Each round client i
receives the global EEN w^t and
1. updates a copy of it with local SGD on the sum of per-exit CE and uploads it
   (the server's FedAvg over the whole EEN, as FedAvg-EE);
2. updates its personal EEN v_i (kept in its state; it starts at the shared
   initial weights, as in the paper) for ``ditto.personal_epochs`` epochs on
       sum_k CE(y, z_k(x; v_i)) + (lambda/2) ||v_i - w^t||^2,
   the proximal pull toward the round's global model w^t (``ditto.lam``).
Evaluation and serving run v_i (the global model for a client that never trained).
"""

from __future__ import annotations

import copy

import torch

from cafe_ray.algorithms.base import (
    ClientContext,
    ClientData,
    ClientOutput,
    Message,
    Params,
    load_params,
    register,
)
from cafe_ray.algorithms.fedavg import FedAvgEE
from cafe_ray.algorithms.training import LossFn, local_sgd, sum_exit_ce
from cafe_ray.models.base import EarlyExitNet

_GLOBAL_STREAM, _PERSONAL_STREAM = 0, 1  # shuffling streams of the two updates


def proximal_loss(anchor: Params, lam: float) -> LossFn:
    """sum_k CE + (lam/2) ||theta - anchor||^2 over the model's parameters (anchor detached)."""
    anchors = {k: v.detach() for k, v in anchor.items()}

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = sum_exit_ce(model, x, y)
        if lam == 0:
            return ce
        prox = sum(((p - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
        return ce + 0.5 * lam * prox

    return loss


@register
class DittoEE(FedAvgEE):
    """Ditto (arXiv:2012.04221): FedAvg global EEN + a proximally regularised personal EEN."""

    name = "ditto_ee"
    personalized = True

    def personal_update(
        self, pmodel: EarlyExitNet, anchor: Params, data: ClientData, ctx: ClientContext
    ) -> tuple[float, int]:
        """Local SGD on v_i with the proximal pull (lambda/2)||v_i - anchor||^2."""
        hp = self.cfg.algorithm.ditto
        train = self.cfg.train
        if hp.personal_epochs is not None:
            train = train.model_copy(update={"local_epochs": hp.personal_epochs})
        return local_sgd(pmodel, data, ctx, train, proximal_loss(anchor, hp.lam), stream=_PERSONAL_STREAM)

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        pmodel = copy.deepcopy(model)  # the initial weights: v_i's start if it never trained
        if personal:
            load_params(pmodel, personal)
        p_loss, p_seen = self.personal_update(pmodel, payload.tensors, data, ctx)

        load_params(model, payload.tensors)
        g_loss, g_seen = local_sgd(model, data, ctx, self.cfg.train, stream=_GLOBAL_STREAM)
        sd = model.state_dict()
        return ClientOutput(
            upload=Message(tensors={k: sd[k].detach().clone() for k in payload.tensors}),
            personal={k: v.detach().clone() for k, v in pmodel.state_dict().items()},
            num_samples=data.num_train,
            samples_processed=g_seen + p_seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": g_loss, "personal_loss": p_loss},
        )

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """The personal EEN v_i; the global one if the client never trained."""
        load_params(model, personal if personal else payload.tensors)
