"""FedRep-EE: shared backbone, personal heads, trained in two alternating phases.

Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021 (arXiv:2102.07078).

Early-exit version (docs/specification.md, Baselines): the backbone is shared
and averaged like FedPer-EE, all exit heads are personal. Each round a client
1. trains the heads of every exit for ``fedrep.head_epochs`` epochs with the
   backbone frozen (sum of per-exit CE), then
2. trains the backbone for ``train.local_epochs`` epochs with the heads frozen.
Frozen parameters are out of the optimizer and have ``requires_grad`` off, so
momentum and weight decay cannot move them either.
"""

from __future__ import annotations

from cafe_ray.algorithms.base import (
    ClientContext,
    ClientData,
    ClientOutput,
    Message,
    Params,
    register,
)
from cafe_ray.algorithms.fedper import FedPerEE, backbone_of, heads_of
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.models.base import BACKBONE_PREFIX, EarlyExitNet

_HEAD_STREAM, _BODY_STREAM = 0, 1  # shuffling streams of the two phases


def train_only(model: EarlyExitNet, backbone: bool) -> list:
    """Freeze one side (requires_grad off) and return the trainable parameters of the other."""
    trainable = []
    for n, p in model.named_parameters():
        on = n.startswith(BACKBONE_PREFIX) == backbone
        p.requires_grad_(on)
        if on:
            trainable.append(p)
    return trainable


def unfreeze(model: EarlyExitNet) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


@register
class FedRepEE(FedPerEE):
    """FedRep (arXiv:2102.07078): heads first with the backbone frozen, then the backbone."""

    name = "fedrep_ee"
    personalized = True

    @property
    def head_init(self) -> str:
        return self.cfg.algorithm.fedrep.head_init

    def train_heads(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[float, int]:
        """Phase 1: every exit head for ``fedrep.head_epochs`` epochs; the backbone does not move."""
        train = self.cfg.train.model_copy(update={"local_epochs": self.cfg.algorithm.fedrep.head_epochs})
        try:
            return local_sgd(model, data, ctx, train, params=train_only(model, backbone=False), stream=_HEAD_STREAM)
        finally:
            unfreeze(model)

    def train_backbone(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[float, int]:
        """Phase 2: the backbone for ``train.local_epochs`` epochs; the heads do not move."""
        try:
            return local_sgd(model, data, ctx, self.cfg.train, params=train_only(model, backbone=True),
                             stream=_BODY_STREAM)
        finally:
            unfreeze(model)

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        self.client_start(model, payload, personal, data, ctx)
        head_loss, head_seen = self.train_heads(model, data, ctx)
        body_loss, body_seen = self.train_backbone(model, data, ctx)
        return ClientOutput(
            upload=Message(tensors=backbone_of(model)),
            personal=heads_of(model),
            num_samples=data.num_train,
            samples_processed=head_seen + body_seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": body_loss, "head_loss": head_loss},
        )
