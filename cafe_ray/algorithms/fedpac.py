"""FedPAC-EE: feature alignment to global prototypes and classifier collaboration.

Xu, Tong, Huang, "Personalized Federated Learning with Feature Alignment and
Classifier Collaboration", ICLR 2023 (arXiv:2306.11867). Reference code:
github.com/JianXu95/FedPAC.

Early-exit version (docs/specification.md, Baselines): the backbone is shared
(sample-weighted mean), every exit head is personal, and everything FedPAC does
with "the" feature and "the" classifier is done per exit k, with f_k(x) the input
of exit k's final linear layer (:mod:`cafe_ray.algorithms.heads`; the pooled
stage feature for the small CNNs). Round t, client i:
1. loads the global backbone and its combined heads from the server (the
   initial heads before its first combination);
2. feature statistics with the received model, per exit: class priors p_c,
   class means mu_c, h_c = p_c mu_c and the variance term
       v = (1/N) [ sum_c p_c E_c||f||^2 - sum_c p_c^2 ||mu_c||^2 ];
3. trains the heads for ``fedpac.head_epochs`` epochs, backbone frozen (CE);
4. trains the backbone, heads frozen, on
       sum_k [ CE(y, z_k) + lam_proto * MSE(f_k(x), c_{k,y}) ]
   where c_{k,y} is the global prototype of class y at exit k (the client's
   own class mean of step 2 for a class no client reported; no alignment
   before the first prototypes exist, as the reference's round 0);
5. uploads the backbone, its heads, (v, h) of step 2 and its class means and
   counts after training.
Server: backbone mean; global prototypes c_{k,y} = sum_i n_iy mu_iky / sum_i n_iy;
and per exit k and participant i the head-combination weights
    alpha_i = argmin_{alpha in simplex} alpha^T (diag(v) + G^(i)) alpha,
    G^(i)_{jl} = sum_c <h_ic - h_jc, h_ic - h_lc>,
(weights below ``fedpac.min_weight`` zeroed, the rest renormalised, as the
reference), and client i's combined head of exit k = sum_j alpha_ij head_jk,
kept for its next round and for evaluation. The QP is solved by accelerated
projected gradient descent (the reference uses cvxpy); the matrix is PSD by
construction, so it converges to the global minimum.

Evaluation / serving runs the global backbone with the client's combined heads
(the eval payload carries every client's; the initial heads if it has none).
The two forward-only statistics passes are charged to the virtual clock as
one third of a training pass each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cafe_ray.algorithms.aggregation import StreamingMean
from cafe_ray.algorithms.base import (
    GLOBAL_NS,
    ClientContext,
    ClientData,
    ClientOutput,
    ClientResult,
    Message,
    Params,
    RoundContext,
    ServerState,
    global_params,
    load_params,
    register,
    with_global,
)
from cafe_ray.algorithms.cafedistill.teacher import project_simplex
from cafe_ray.algorithms.fedper import FedPerEE
from cafe_ray.algorithms.fedrep import train_only, unfreeze
from cafe_ray.algorithms.heads import HeadProbe
from cafe_ray.algorithms.pairwise import load_client, mix, store_client
from cafe_ray.algorithms.training import LossFn, local_sgd, sum_exit_ce, tensor_sum
from cafe_ray.models.base import BACKBONE_PREFIX, EXIT_PREFIX, EarlyExitNet, exit_of_key

# Message / state keys besides the model's own.
PROTO, PROTO_MASK = "proto.", "proto_mask"  # proto.{k}: (C, D_k) global prototypes; mask (C,)
STAT_V, STAT_H = "stat.v", "stat.h."  # (m,) variance terms; stat.h.{k}: (C, D_k) h_c = p_c mu_c
LPROTO, COUNTS = "lproto.", "counts"  # lproto.{k}: (C, D_k) class means after training; (C,) counts
CHEAD_NS = "chead/"  # chead/<cid>/exits.*: client cid's combined heads

_HEAD_STREAM, _BODY_STREAM = 0, 1


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class ExitStats:
    """Per-class feature statistics of one exit on a client's training split."""

    counts: torch.Tensor  # (C,) samples per class
    means: torch.Tensor  # (C, D) mu_c (zero for absent classes)
    sq_norms: torch.Tensor  # (C,) E_c ||f||^2 (zero for absent classes)

    @property
    def priors(self) -> torch.Tensor:
        return self.counts / self.counts.sum().clamp_min(1.0)

    def h(self) -> torch.Tensor:
        """h_c = p_c mu_c: (C, D)."""
        return self.priors[:, None] * self.means

    def v(self) -> float:
        """(1/N) [sum_c p_c E_c||f||^2 - sum_c p_c^2 ||mu_c||^2]."""
        n = float(self.counts.sum())
        if n == 0:
            return 0.0
        p = self.priors
        return float((p * self.sq_norms).sum() - (p * p * (self.means**2).sum(dim=1)).sum()) / n


@torch.no_grad()
def feature_statistics(
    probe: HeadProbe, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 512
) -> list[ExitStats]:
    """Per-exit class counts, class means and mean squared norms of f_k over (x, y)."""
    probe.model.eval()
    m = probe.model.num_exits
    counts = torch.bincount(y.long(), minlength=num_classes).to(torch.float64)
    sums: list[torch.Tensor] = []
    sq = [torch.zeros(num_classes, dtype=torch.float64, device=y.device) for _ in range(m)]
    for start in range(0, len(y), batch_size):
        yb = y[start : start + batch_size].long()
        _, feats = probe(x[start : start + batch_size])
        for k, f in enumerate(feats):
            f = f.reshape(f.shape[0], -1).to(torch.float64)  # (B, D_k)
            if len(sums) < m:
                sums.append(torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device))
            sums[k].index_add_(0, yb, f)
            sq[k].index_add_(0, yb, (f * f).sum(dim=1))
    safe = counts.clamp_min(1.0)
    return [ExitStats(counts, sums[k] / safe[:, None], sq[k] / safe) for k in range(len(sums))]


# ---------------------------------------------------------------- classifier QP
def simplex_qp(P: np.ndarray, iters: int = 5000, tol: float = 1e-12) -> np.ndarray:
    """argmin over the probability simplex of a^T P a (P symmetric PSD): accelerated projected gradient."""
    P = np.asarray(P, dtype=np.float64)
    n = P.shape[0]
    if P.shape != (n, n) or n == 0:
        raise ValueError(f"simplex_qp needs a non-empty square matrix, got shape {P.shape}")
    P = 0.5 * (P + P.T)
    L = 2.0 * float(np.linalg.eigvalsh(P).max(initial=0.0))
    a = np.full(n, 1.0 / n)
    if L <= 0:
        return a
    z, t = a.copy(), 1.0
    for _ in range(iters):
        a_next = project_simplex(z - (2.0 * P @ z) / L)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        z = a_next + ((t - 1.0) / t_next) * (a_next - a)
        if np.abs(a_next - a).max() < tol:
            a = a_next
            break
        a, t = a_next, t_next
    return a


def combination_weights(H: np.ndarray, v: np.ndarray, i: int, min_weight: float = 0.0) -> np.ndarray:
    """alpha_i over the n clients for one exit: H (n, C, D) of h_c = p_c mu_c, v (n,) variances.

    P = diag(v) + G with G_jl = sum_c <H_i,c - H_j,c, H_i,c - H_l,c>; weights below
    ``min_weight`` are zeroed and the rest renormalised to sum to 1.
    """
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    diff = (H[i][None] - H).reshape(n, -1)  # (n, C*D)
    P = np.diag(np.asarray(v, dtype=np.float64)) + diff @ diff.T
    a = simplex_qp(P)
    a = np.where(a >= min_weight, a, 0.0)
    if a.sum() <= 0:
        a = np.eye(n)[i]
    return a / a.sum()


# --------------------------------------------------------------------- local loss
def alignment_targets(protos: torch.Tensor, mask: torch.Tensor, local_means: torch.Tensor) -> torch.Tensor:
    """Per-class targets: the global prototype where one exists, else the client's own mean: (C, D)."""
    return torch.where(mask.bool()[:, None], protos, local_means.to(protos.dtype))


def alignment_loss(feature: torch.Tensor, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE(f(x), c_y) averaged over batch and feature dimensions (the reference's nn.MSELoss)."""
    f = feature.reshape(feature.shape[0], -1)
    return F.mse_loss(f, targets[y].detach().to(f.dtype))


def aligned_loss(probe: HeadProbe, targets: list[torch.Tensor] | None, lam: float) -> LossFn:
    """sum_k CE(y, z_k) + lam * sum_k MSE(f_k, c_{k,y}); plain per-exit CE without targets."""

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if targets is None or lam == 0:
            return sum_exit_ce(model, x, y)
        logits, feats = probe(x)
        ce = tensor_sum(F.cross_entropy(z, y) for z in logits)
        align = tensor_sum(alignment_loss(f, y, c) for f, c in zip(feats, targets, strict=True))
        return ce + lam * align

    return loss


# ---------------------------------------------------------------------- algorithm
@register
class FedPACEE(FedPerEE):
    """FedPAC (arXiv:2306.11867): prototype-aligned shared backbone, QP-combined personal heads."""

    name = "fedpac_ee"
    personalized = True

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        """Per participant: the backbone, its combined heads (if any) and the global prototypes."""
        common = global_params(state)
        common.update({k: v for k, v in state.tensors.items() if k.startswith(PROTO) or k == PROTO_MASK})
        out: dict[int, Message] = {}
        for cid in ctx.participants:
            out[cid] = Message(tensors={**common, **load_client(state, CHEAD_NS, cid)})
        return out

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        hp = self.cfg.algorithm.fedpac
        load_params(model, {k: v for k, v in payload.tensors.items()
                            if k.startswith(BACKBONE_PREFIX) or k.startswith(EXIT_PREFIX)})
        C, m, n = model.num_classes, model.num_exits, data.num_train
        probe = HeadProbe(model)
        before = feature_statistics(probe, data.x_train, data.y_train, C)

        head_train = self.cfg.train.model_copy(
            update={"local_epochs": hp.head_epochs, "lr": hp.head_lr or self.cfg.train.lr})
        try:
            head_loss, head_seen = local_sgd(model, data, ctx, head_train, params=train_only(model, backbone=False),
                                             stream=_HEAD_STREAM)
        finally:
            unfreeze(model)

        targets = None
        if PROTO_MASK in payload.tensors:
            mask = payload.tensors[PROTO_MASK]
            targets = [alignment_targets(payload.tensors[f"{PROTO}{k}"], mask, before[k].means) for k in range(m)]
        try:
            loss, seen = local_sgd(model, data, ctx, self.cfg.train, aligned_loss(probe, targets, hp.lam_proto),
                                   params=train_only(model, backbone=True), stream=_BODY_STREAM)
        finally:
            unfreeze(model)
        after = feature_statistics(probe, data.x_train, data.y_train, C)

        sd = model.state_dict()
        upload = {k: v.detach().clone() for k, v in sd.items()}
        upload[STAT_V] = torch.tensor([s.v() for s in before], dtype=torch.float32)
        upload[COUNTS] = after[0].counts.to(torch.float32)
        for k in range(m):
            upload[f"{STAT_H}{k}"] = before[k].h().to(torch.float32)
            upload[f"{LPROTO}{k}"] = after[k].means.to(torch.float32)
        return ClientOutput(
            upload=Message(tensors=upload),
            personal=None,
            num_samples=n,
            samples_processed=head_seen + seen + (2 * n) // 3,
            trained_depth=m,
            metrics={"train_loss": loss, "head_loss": head_loss, "aligned": float(targets is not None)},
        )

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        """Backbone mean, global prototypes, and every participant's QP-combined heads."""
        if not results:
            return state
        old = global_params(state)
        mean = StreamingMean()
        for r in results:
            mean.add({k: r.output.upload.tensors[k] for k in old}, float(r.output.num_samples))
        tensors = {k: v for k, v in state.tensors.items() if not k.startswith(GLOBAL_NS)}
        ups = [r.output.upload.tensors for r in results]
        m = int(ups[0][STAT_V].numel())

        # global prototypes: count-weighted class means over this round's clients
        counts = torch.stack([u[COUNTS].to(torch.float64) for u in ups])  # (n, C)
        total = counts.sum(dim=0)  # (C,)
        for k in range(m):
            means = torch.stack([u[f"{LPROTO}{k}"].to(torch.float64) for u in ups])  # (n, C, D)
            proto = (counts[:, :, None] * means).sum(dim=0) / total.clamp_min(1.0)[:, None]
            tensors[f"{PROTO}{k}"] = proto.to(torch.float32)
        tensors[PROTO_MASK] = (total > 0).to(torch.float32)

        # classifier collaboration, exit by exit
        heads = [{k: v for k, v in u.items() if exit_of_key(k) is not None} for u in ups]
        weights: dict[str, list[list[float]]] = {}
        combined: dict[int, Params] = {r.client_id: {} for r in results}
        for k in range(m):
            H = np.stack([u[f"{STAT_H}{k}"].double().numpy() for u in ups])  # (n, C, D)
            v = np.array([float(u[STAT_V][k]) for u in ups])
            exit_heads = [{key: t for key, t in h.items() if exit_of_key(key) == k} for h in heads]
            for i, r in enumerate(results):
                alpha = combination_weights(H, v, i, self.cfg.algorithm.fedpac.min_weight)
                combined[r.client_id].update(mix(exit_heads, alpha.tolist(), like=exit_heads[i]))
                weights.setdefault(str(r.client_id), []).append([round(float(a), 6) for a in alpha])
        for cid, params in combined.items():
            store_client(tensors, CHEAD_NS, cid, params)
        meta = dict(state.meta)
        meta["head_weights"] = {"clients": [r.client_id for r in results], "alpha": weights}
        return with_global(ServerState(tensors=tensors, meta=meta), mean.result(like=old))

    def eval_payload(self, state: ServerState) -> Message:
        """The backbone and every client's combined heads (not traffic)."""
        tensors = global_params(state)
        tensors.update({k: v for k, v in state.tensors.items() if k.startswith(CHEAD_NS)})
        return Message(tensors=tensors)

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """The global backbone with client ``ctx.client_id``'s combined heads (initial heads if none)."""
        load_params(model, {k: v for k, v in payload.tensors.items() if k.startswith(BACKBONE_PREFIX)})
        prefix = f"{CHEAD_NS}{ctx.client_id}/"
        load_params(model, {k[len(prefix):]: v for k, v in payload.tensors.items() if k.startswith(prefix)})
