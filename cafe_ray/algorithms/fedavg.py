"""FedAvg-EE and FedProx-EE: the whole early-exit network is shared and averaged.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629). FedProx: Li et al.,
"Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).
Early-exit versions as defined in docs/specification.md (Baselines): every exit
trained with the sum of per-exit cross-entropy.
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
from cafe_ray.algorithms.training import LossFn, local_sgd, sum_exit_ce
from cafe_ray.models.base import EarlyExitNet


@register
class FedAvgEE(Algorithm):
    name = "fedavg_ee"
    vectorizable = True

    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        return with_global(ServerState(tensors={}), {k: v.clone() for k, v in model.state_dict().items()})

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        msg = Message(tensors=global_params(state))
        return {cid: msg for cid in ctx.participants}

    def _loss(self, anchor: Params | None) -> LossFn:  # FedProx's hook
        return sum_exit_ce

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        self.client_start(model, payload, personal, data, ctx)
        loss, seen = local_sgd(model, data, ctx, self.cfg.train, self._loss(payload.tensors))
        return self.client_finish(model, payload, personal, data, ctx, loss, seen)

    def client_start(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                     data: ClientData, ctx: ClientContext) -> CohortExtras | None:
        load_params(model, payload.tensors)
        return None  # the default batched loss needs nothing beside the model

    def client_finish(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                      data: ClientData, ctx: ClientContext, loss: float, seen: int,
                      extras: Params | None = None) -> ClientOutput:
        sd = model.state_dict()
        upload = {k: sd[k].detach().clone() for k in payload.tensors}
        return ClientOutput(
            upload=Message(tensors=upload),
            personal=None,
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


@register
class FedProxEE(FedAvgEE):
    name = "fedprox_ee"

    def _loss(self, anchor: Params | None) -> LossFn:
        mu = self.cfg.algorithm.fedprox.mu_prox
        assert anchor is not None
        anchors = {k: v.detach() for k, v in anchor.items()}

        def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            prox = sum(((p - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
            return sum_exit_ce(model, x, y) + 0.5 * mu * prox

        return loss
