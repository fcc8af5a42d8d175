"""FedAMP-EE: attentive message passing between whole early-exit networks.

Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, "Personalized Cross-Silo Federated
Learning on Non-IID Data", AAAI 2021 (arXiv:2007.03797).

Early-exit version (docs/specification.md, Baselines): the personalized
model theta_i is the client's whole EEN (backbone and every exit head). Round t:
- server (:meth:`FedAMPEE.server_payloads`): for every participant i, with the
  latest uploaded theta_j of every other client j the server holds,
      xi_ij = alpha_k * A'(||theta_i - theta_j||^2),  A'(x) = exp(-x / sigma) / sigma,
      xi_ii = 1 - sum_{j != i} xi_ij,
      u_i   = sum_j xi_ij theta_j                      (the "cloud model"),
  so that closer models get larger weights; u_i is sent to client i;
- client: from its own theta_i, local SGD on
      sum_k CE(y, z_k) + lambda / (2 alpha_k) ||theta - u_i||^2,
  then theta_i is uploaded (and kept as personal state for evaluation);
- server: stores every uploaded theta_i.

Decisions where the paper is open (documented, see tests):
- a client that never uploaded is represented by the shared initial model
  (what its local model is before training); it sends nothing to others;
- the paper assumes alpha_k small enough that xi_ii >= 0. With the defaults
  (sigma = 10, early rounds where models are close, 20 neighbours) the
  neighbours' weights sum far above 1, and a plain rescaling gave xi_ii = 0:
  u_i forgot the client's own model (the degenerate case). The own weight is
  therefore floored at ``fedamp.min_self_weight``: if the neighbours' weights sum
  above 1 - min_self_weight they are rescaled to sum to exactly that, so u_i
  stays a convex combination with xi_ii >= min_self_weight > 0 (the paper's
  heuristic variant likewise fixes a self-attention weight xi_ii);
- evaluation runs the personal theta_i (the initial model if it never trained).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
from cafe_ray.algorithms.ditto import proximal_loss
from cafe_ray.algorithms.pairwise import (
    gram,
    load_client,
    mix,
    squared_distances,
    store_client,
    stored_ids,
)
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.models.base import EarlyExitNet

INIT_NS = "init/"  # the shared initial EEN
MODELS_NS = "models/"  # models/<cid>/<key>: client cid's latest uploaded theta_i


def attention_row(
    sq_dists: np.ndarray, alpha_k: float, sigma: float, min_self_weight: float = 0.0
) -> tuple[np.ndarray, float]:
    """(xi_ij for the neighbours j, xi_ii) from ||theta_i - theta_j||^2 to each neighbour.

    xi_ij = alpha_k * exp(-d_ij / sigma) / sigma, xi_ii = 1 - sum_j xi_ij; if that
    would fall below ``min_self_weight`` the neighbours are rescaled to sum to
    1 - min_self_weight and xi_ii = min_self_weight.
    """
    if not (alpha_k > 0 and sigma > 0):
        raise ValueError(f"fedamp: alpha_k and sigma must be > 0, got alpha_k={alpha_k}, sigma={sigma}")
    if not 0.0 <= min_self_weight <= 1.0:
        raise ValueError(f"fedamp.min_self_weight must be in [0, 1], got {min_self_weight}")
    d = np.asarray(sq_dists, dtype=np.float64)
    xi = alpha_k * np.exp(-d / sigma) / sigma
    total = float(xi.sum())
    cap = 1.0 - min_self_weight
    if total > cap:
        return xi * (cap / total), float(min_self_weight)
    return xi, 1.0 - total


def attention_matrix(sq_dists: np.ndarray, alpha_k: float, sigma: float, min_self_weight: float = 0.0) -> np.ndarray:
    """Xi (n, n) over a pool where every client is every other's neighbour; rows sum to 1."""
    D = np.asarray(sq_dists, dtype=np.float64)
    n = D.shape[0]
    Xi = np.zeros((n, n))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        xi, self_w = attention_row(D[i, others], alpha_k, sigma, min_self_weight)
        Xi[i, others] = xi
        Xi[i, i] = self_w
    return Xi


def initial_model(state: ServerState) -> Params:
    """The shared initial EEN kept under ``init/``."""
    return {k[len(INIT_NS):]: v for k, v in state.tensors.items() if k.startswith(INIT_NS)}


@register
class FedAMPEE(Algorithm):
    """FedAMP (arXiv:2007.03797): u_i = sum_j xi_ij theta_j, local proximal pull to u_i."""

    name = "fedamp_ee"
    personalized = True

    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        return ServerState(tensors={INIT_NS + k: v.detach().clone() for k, v in model.state_dict().items()})

    def cloud_models(self, state: ServerState, participants: Sequence[int]) -> dict[int, tuple[Params, float]]:
        """(u_i, xi_ii) for every participant i."""
        hp = self.cfg.algorithm.fedamp
        init = initial_model(state)
        stored = stored_ids(state, MODELS_NS)
        ids = sorted(set(stored) | set(participants))
        have = set(stored)
        models = [load_client(state, MODELS_NS, c) if c in have else init for c in ids]
        D = squared_distances(gram(models))
        pos = {c: i for i, c in enumerate(ids)}
        out: dict[int, tuple[Params, float]] = {}
        for cid in participants:
            i = pos[cid]
            nbrs = [pos[c] for c in stored if c != cid]
            xi, self_w = attention_row(D[i, nbrs], hp.alpha_k, hp.sigma, hp.min_self_weight)
            u = mix([models[j] for j in nbrs] + [models[i]], [*xi.tolist(), self_w], like=init)
            out[cid] = (u, self_w)
        return out

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        clouds = self.cloud_models(state, ctx.participants)
        return {cid: Message(tensors=u, meta={"xi_self": xi_self}) for cid, (u, xi_self) in clouds.items()}

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        hp = self.cfg.algorithm.fedamp
        if personal:
            load_params(model, personal)
        loss, seen = local_sgd(model, data, ctx, self.cfg.train, proximal_loss(payload.tensors, hp.lam / hp.alpha_k))
        theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ClientOutput(
            upload=Message(tensors=theta),
            personal=theta,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss, "xi_self": float(payload.meta.get("xi_self", 1.0))},
        )

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        """Store every uploaded theta_i (the messages are computed at the next payloads)."""
        if not results:
            return state
        tensors = dict(state.tensors)
        for r in results:
            store_client(tensors, MODELS_NS, r.client_id, r.output.upload.tensors)
        return ServerState(tensors=tensors, meta=dict(state.meta))

    def eval_payload(self, state: ServerState) -> Message:
        return Message()  # everything an evaluated client runs is personal

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """The personal theta_i (the initial model if the client never trained)."""
        if personal:
            load_params(model, personal)
