"""Local-EE: no federation; each client trains its own early-exit network.

The lower bound of personalization (docs/specification.md, Baselines). Nothing
goes up or down; the whole model is personal state.
"""

from __future__ import annotations

from collections.abc import Sequence

from cafe_ray.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientOutput,
    ClientResult,
    Message,
    Params,
    RoundContext,
    ServerState,
    load_params,
    register,
)
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.models.base import EarlyExitNet


@register
class LocalEE(Algorithm):
    name = "local_ee"
    personalized = True

    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        return ServerState(tensors={})

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        return {cid: Message() for cid in ctx.participants}

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        if personal:
            load_params(model, personal)
        loss, seen = local_sgd(model, data, ctx, self.cfg.train)
        new_personal = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ClientOutput(
            upload=Message(),
            personal=new_personal,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss},
        )

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        return state
