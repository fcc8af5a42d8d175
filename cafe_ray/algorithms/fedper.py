"""FedPer-EE: shared backbone, every exit head personal.

Arivazhagan et al., "Federated Learning with Personalization Layers",
arXiv:1912.00818. In the early-exit version (docs/specification.md) this is
CAFEDistill without distillation and without student selection: the key ablation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cafe_ray.algorithms.aggregation import StreamingMean
from cafe_ray.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientOutput,
    ClientResult,
    CohortExtras,
    Message,
    Params,
    RoundContext,
    ServerState,
    global_params,
    load_params,
    register,
    with_global,
)
from cafe_ray.algorithms.heads import add_log_prior_to_heads
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.models.base import EarlyExitNet


def backbone_of(model: EarlyExitNet) -> Params:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in model.backbone_keys()}


def heads_of(model: EarlyExitNet) -> Params:
    sd = model.state_dict()
    backbone = set(model.backbone_keys())
    return {k: v.detach().clone() for k, v in sd.items() if k not in backbone}


@register
class FedPerEE(Algorithm):
    name = "fedper_ee"
    personalized = True
    vectorizable = True

    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        return with_global(ServerState(tensors={}), backbone_of(model))

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        msg = Message(tensors=global_params(state))
        return {cid: msg for cid in ctx.participants}

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        self.client_start(model, payload, personal, data, ctx)
        loss, seen = local_sgd(model, data, ctx, self.cfg.train)
        return self.client_finish(model, payload, personal, data, ctx, loss, seen)

    def client_start(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                     data: ClientData, ctx: ClientContext) -> CohortExtras | None:
        load_params(model, payload.tensors)
        if personal:
            load_params(model, personal)
        elif self.head_init == "prior":  # first visit: heads start with the client's log label prior
            add_log_prior_to_heads(model, torch.bincount(data.y_train.long(), minlength=model.num_classes))
        return None  # the default batched loss needs nothing beside the model

    @property
    def head_init(self) -> str:
        """``fedper.head_init`` (FedRep-EE reads its own section)."""
        return self.cfg.algorithm.fedper.head_init

    def client_finish(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                      data: ClientData, ctx: ClientContext, loss: float, seen: int,
                      extras: Params | None = None) -> ClientOutput:
        return ClientOutput(
            upload=Message(tensors=backbone_of(model)),
            personal=heads_of(model),
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss},
        )

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        if not results:
            return state
        mean = StreamingMean()
        for r in results:
            mean.add(r.output.upload.tensors, float(r.output.num_samples))
        return with_global(state, mean.result(like=global_params(state)))
