"""pFedGraph-EE: personalized aggregation over an inferred collaboration graph.

Ye, Ni, Wu, Chen, Wang, "Personalized Federated Learning with Inferred
Collaboration Graphs", ICML 2023 (PMLR vol. 202). Reference code:
github.com/MediaBrain-SJTU/pFedGraph.

Early-exit version (docs/specification.md, Baselines); the model is the
client's whole EEN. Round t:
- client i starts from its aggregated model thetabar_i (the shared initial
  model before its first aggregation) and runs local SGD on
      sum_k CE(y, z_k) + lambda * (1 - cos(theta, thetabar_i)),
  a pull toward thetabar_i (none before the first aggregation, as in the
  reference), then uploads theta_i (also kept as personal state);
- server (:meth:`PFedGraphEE.aggregate`), over this round's uploads: with
  Delta_j = theta_j - theta_0 (theta_0 the initial model) and
  d_ij = -cos(Delta_i, Delta_j) (set to -1 when below -0.9, as the reference),
  p_j = n_j / sum n the data-size weights, each row of the collaboration graph
  solves the QP
      a_i = argmin_{a in simplex}  sum_j a_j d_ij + alpha ||a - p||^2
          = proj_simplex(p - d_i / (2 alpha)),
  and thetabar_i = sum_j a_ij theta_j is stored for client i's next round.
  ``alpha`` large -> data-size (FedAvg) weights; small -> the most similar models.

Decisions (documented): the regulariser is the reference's "approx" variant
(cosine to the unnormalised aggregated model) with the sign of a *pull*, as the
paper's objective and the project's spec say (the reference code's
``+lam * cos`` term would push away); evaluation runs the personal theta_i
(the initial model for a client that never trained), since the aggregated
models live on the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
from cafe_ray.algorithms.cafedistill.teacher import project_simplex
from cafe_ray.algorithms.fedamp import INIT_NS, initial_model
from cafe_ray.algorithms.pairwise import (
    cosine_similarities,
    float_keys,
    gram,
    load_client,
    mix,
    store_client,
    stored_ids,
)
from cafe_ray.algorithms.training import LossFn, local_sgd, sum_exit_ce
from cafe_ray.models.base import EarlyExitNet

AGG_NS = "agg/"  # agg/<cid>/<key>: thetabar_i, client cid's aggregated model


def graph_weights(cos: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
    """Collaboration graph A (n, n): row i = proj_simplex(p - d_i / (2 alpha)), d = -cos.

    Cosines above 0.9 count as 1 (d = -1), as in the reference implementation.
    Every row is >= 0 and sums to 1.
    """
    if not alpha > 0:
        raise ValueError(f"pfedgraph.alpha must be > 0, got {alpha}")
    d = -np.asarray(cos, dtype=np.float64)
    d = np.where(d < -0.9, -1.0, d)
    p = np.asarray(p, dtype=np.float64)
    if d.ndim != 2 or d.shape != (p.size, p.size):
        raise ValueError(f"cos must be ({p.size}, {p.size}) for {p.size} data-size weights, got {d.shape}")
    return np.stack([project_simplex(p - row / (2.0 * alpha)) for row in d])


def cosine_pull(anchor: Params, lam: float) -> LossFn:
    """sum_k CE + lam * (1 - cos(theta, anchor)) over the model's parameters (anchor detached)."""
    anchors = {k: v.detach() for k, v in anchor.items()}

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = sum_exit_ce(model, x, y)
        if lam == 0:
            return ce
        names = [n for n, _ in model.named_parameters()]
        theta = torch.cat([p.reshape(-1) for p in model.parameters()])
        ref = torch.cat([anchors[n].reshape(-1).to(theta.dtype) for n in names])
        return ce + lam * (1.0 - F.cosine_similarity(theta, ref, dim=0))

    return loss


@register
class PFedGraphEE(Algorithm):
    """pFedGraph (ICML 2023): graph QP over model cosine similarity and data sizes."""

    name = "pfedgraph_ee"
    personalized = True

    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        return ServerState(tensors={INIT_NS + k: v.detach().clone() for k, v in model.state_dict().items()})

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        """thetabar_i where the server has one (with the pull on), else the initial model."""
        have = set(stored_ids(state, AGG_NS))
        init = initial_model(state)
        out: dict[int, Message] = {}
        for cid in ctx.participants:
            if cid in have:
                out[cid] = Message(tensors=load_client(state, AGG_NS, cid), meta={"regularize": True})
            else:
                out[cid] = Message(tensors=init, meta={"regularize": False})
        return out

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        load_params(model, payload.tensors)
        lam = self.cfg.algorithm.pfedgraph.lam if payload.meta.get("regularize", False) else 0.0
        loss, seen = local_sgd(model, data, ctx, self.cfg.train, cosine_pull(payload.tensors, lam))
        theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ClientOutput(
            upload=Message(tensors=theta),
            personal=theta,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss},
        )

    def graph(self, state: ServerState, results: Sequence[ClientResult]) -> np.ndarray:
        """The collaboration graph over this round's uploads (rows/columns in result order)."""
        init = initial_model(state)
        keys = float_keys(init)
        deltas = [{k: r.output.upload.tensors[k] - init[k] for k in keys} for r in results]
        sizes = np.array([float(r.output.num_samples) for r in results])
        if sizes.sum() <= 0:
            sizes = np.ones_like(sizes)
        return graph_weights(cosine_similarities(gram(deltas, keys)), sizes / sizes.sum(),
                             self.cfg.algorithm.pfedgraph.alpha)

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        """thetabar_i = sum_j a_ij theta_j for every uploading client i."""
        if not results:
            return state
        A = self.graph(state, results)
        uploads = [r.output.upload.tensors for r in results]
        tensors = dict(state.tensors)
        for i, r in enumerate(results):
            store_client(tensors, AGG_NS, r.client_id, mix(uploads, A[i].tolist(), like=uploads[i]))
        meta = dict(state.meta)
        meta["graph"] = {"clients": [r.client_id for r in results], "weights": A.round(6).tolist()}
        return ServerState(tensors=tensors, meta=meta)

    def eval_payload(self, state: ServerState) -> Message:
        return Message()  # everything an evaluated client runs is personal

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """The personal theta_i (the initial model if the client never trained)."""
        if personal:
            load_params(model, personal)
