"""FedRoD-EE: a generic head (balanced softmax, shared) plus a personal head per exit.

Chen, Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022 (arXiv:2107.00778). Balanced softmax: Ren et al.,
"Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020
(arXiv:2007.10740).

Early-exit version (docs/specification.md, Baselines). The EEN's own exit
heads are the *generic* heads: they and the backbone are shared and averaged
(sample-weighted, as FedAvg-EE). Every exit k also has a *personal* head, a
linear layer on f_k(x), the input of the generic head's final linear layer
(:mod:`cafe_ray.algorithms.heads`; for the small CNNs that is the pooled stage
feature, i.e. FedRoD's linear P-head on the body feature). Per batch the client
minimises, with n_c its training count of class c,
    sum_k BSM(z_k^G, y)                 BSM(z, y) = CE(z + log n, y)
  + sum_k CE(z_k^G.detach() + P_k(f_k.detach()), y)
so the balanced loss trains backbone + generic heads and the personal loss only
the personal heads (one SGD optimizer over both is exactly two optimizers with
the same settings, since the gradients are disjoint).

Personal logits are z_k^G + P_k(f_k) = (W_k^G + W_k^P) f_k + (b_k^G + b_k^P):
:meth:`FedRoDEE.load_for_eval` loads the *summed* final-linear weights, so the
evaluated / served model is a plain EarlyExitNet whose forward gives the
personal logits. Personal heads start at zero (``fedrod.personal_init: zero``:
personal logits = generic logits at first) or at a copy of the generic head
(``generic``, as PFLlib's implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cafe_ray.algorithms.base import (
    ClientContext,
    ClientData,
    ClientOutput,
    CohortExtras,
    CohortOutputs,
    Message,
    Params,
    load_params,
    register,
)
from cafe_ray.algorithms.batched import masked_ce
from cafe_ray.algorithms.fedavg import FedAvgEE
from cafe_ray.algorithms.heads import PRIOR_FLOOR, HeadProbe, final_linear_keys
from cafe_ray.algorithms.training import LossFn, local_sgd, tensor_sum
from cafe_ray.models.base import EarlyExitNet

PHEAD_PREFIX = "phead."  # personal state: phead.{k}.weight / phead.{k}.bias


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """CE(z + log n, y), batch mean: the balanced softmax with the client's class counts n.

    Classes the client never saw have log 0 = -inf: their probability is 0, and
    since y is always a seen class the loss and its gradient stay finite.
    """
    log_prior = torch.log(counts.to(logits.dtype))  # (C,)
    return F.cross_entropy(logits + log_prior.unsqueeze(0), y)


def personal_logits(generic: torch.Tensor, feature: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z^G + P(f) with the personal head's own gradient only: (B, C)."""
    return generic.detach() + F.linear(feature.detach(), weight, bias)


PERSONAL_CE = ("detached", "backbone")
PERSONAL_GENERIC = ("live", "received")

Head = tuple[torch.Tensor, torch.Tensor]  # (weight (C, D), bias (C,)) of one exit's final linear layer


def received_heads(probe: HeadProbe) -> list[Head]:
    """(W_k^G0, b_k^G0) per exit: the generic heads as received this round, held fixed."""
    return [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in probe.linears]


def personal_ce_logits(
    probe: HeadProbe,
    logits: list[torch.Tensor],
    feats: list[torch.Tensor],
    heads: list[tuple[nn.Parameter, nn.Parameter]],
    exits: list[int],
    *,
    ce: str = "detached",
    received: list[Head] | None = None,
) -> dict[int, torch.Tensor]:
    """The personal logits the personal CE acts on, for every exit in ``exits``.

    Every form has the values of the personal logits z_k^G + P_k(f_k); they differ
    only in where the CE's gradient goes (``ce``) and in which generic head the
    residual is fitted against (``received``):
    - live, detached (FedRoD): z_k^G.detach() + P_k(f_k.detach()): the residual heads only;
    - live, backbone: W_k^G.detach() f_k + b_k^G.detach() + P_k(f_k): also the stages under
      f_k (as FedPer-EE's personal CE), never the generic head, which BSM alone trains;
    - received: (W_k^G0 + W_k^P) f_k + b_k^G0 + b_k^P with the generic head the client
      received this round (the one its personal logits use at inference, after the
      server averages), f_k detached unless ``ce`` is backbone.
    """
    if ce not in PERSONAL_CE:
        raise ValueError(f"personal CE form {ce!r} is not one of {PERSONAL_CE}")
    if received is not None:
        def fixed(k: int, f: torch.Tensor) -> torch.Tensor:
            w0, b0 = received[k]
            return F.linear(f, w0 + heads[k][0], b0 + heads[k][1])

        return {k: fixed(k, feats[k] if ce == "backbone" else feats[k].detach()) for k in exits}
    if ce == "backbone":
        return {k: F.linear(feats[k], probe.linears[k].weight.detach(), probe.linears[k].bias.detach())
                + F.linear(feats[k], *heads[k]) for k in exits}
    return {k: personal_logits(logits[k], feats[k], *heads[k]) for k in exits}


def fedrod_loss(
    probe: HeadProbe,
    heads: list[tuple[nn.Parameter, nn.Parameter]],
    counts: torch.Tensor,
    *,
    ce: str = "detached",
    generic: str = "live",
) -> LossFn:
    """sum_k BSM(z_k^G) + sum_k CE(personal logits of exit k) (:func:`personal_ce_logits`).

    ``generic: received`` snapshots the generic heads now (when the loss is built,
    after the payload is loaded), i.e. the heads the client received.
    """
    if generic not in PERSONAL_GENERIC:
        raise ValueError(f"fedrod.personal_generic: {generic!r} is not one of {PERSONAL_GENERIC}")
    received = received_heads(probe) if generic == "received" else None
    exits = list(range(len(heads)))

    def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, feats = probe(x)
        bsm = tensor_sum(balanced_softmax_loss(z, y, counts) for z in logits)
        z_ce = personal_ce_logits(probe, logits, feats, heads, exits, ce=ce, received=received)
        return bsm + tensor_sum(F.cross_entropy(z_ce[k], y) for k in exits)

    return loss


def _phead_key(k: int, part: str) -> str:
    return f"{PHEAD_PREFIX}{k}.{part}"




def residual_heads(
    model: EarlyExitNet, personal: Params | None, init: str = "zero", counts: torch.Tensor | None = None
) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(W_k^P, b_k^P) per exit: from ``personal`` (``phead.*`` keys), else initialised by ``init``.

    zero: personal logits = generic logits; generic: a copy of the generic head;
    prior: W = 0 and b = log of the client's label prior (from ``counts``), so that
    the personal logits of a balanced-softmax generic head start as the client's
    Bayes posterior, p_i(y|x) proportional to p_bal(y|x) pi_i(y), before any training.
    """
    sd = model.state_dict()
    heads = []
    for k in range(model.num_exits):
        wk, bk = final_linear_keys(model, k)
        if personal and _phead_key(k, "weight") in personal:
            w, b = personal[_phead_key(k, "weight")], personal[_phead_key(k, "bias")]
        elif init == "generic":
            w, b = sd[wk], sd[bk]
        elif init == "prior":
            if counts is None:
                raise ValueError("personal_init=prior needs the client's label counts")
            prior = counts.to(sd[bk].dtype) / counts.sum().clamp_min(1.0)
            w, b = torch.zeros_like(sd[wk]), prior.clamp_min(PRIOR_FLOOR).log()
        else:
            w, b = torch.zeros_like(sd[wk]), torch.zeros_like(sd[bk])
        heads.append((nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())))
    return heads


def residual_state(heads: list[tuple[nn.Parameter, nn.Parameter]]) -> Params:
    """The personal state (``phead.{k}.weight|bias``) of residual heads."""
    out: Params = {}
    for k, (w, b) in enumerate(heads):
        out[_phead_key(k, "weight")] = w.detach().clone()
        out[_phead_key(k, "bias")] = b.detach().clone()
    return out


def load_summed_heads(model: EarlyExitNet, personal: Params | None) -> None:
    """W^G + W^P and b^G + b^P into every exit's final linear layer (no-op without a personal state)."""
    if not personal:
        return
    sd = model.state_dict()
    summed: Params = {}
    for k in range(model.num_exits):
        wk, bk = final_linear_keys(model, k)
        summed[wk] = sd[wk] + personal[_phead_key(k, "weight")]
        summed[bk] = sd[bk] + personal[_phead_key(k, "bias")]
    load_params(model, summed)


@register
class FedRoDEE(FedAvgEE):
    """FedRoD (arXiv:2107.00778): shared backbone + BSM generic heads, personal residual heads."""

    name = "fedrod_ee"
    personalized = True
    vectorizable = True

    def personal_heads(
        self, model: EarlyExitNet, personal: Params | None, counts: torch.Tensor | None = None
    ) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(W_k^P, b_k^P) per exit: from the personal state, else the configured initialisation."""
        return residual_heads(model, personal, self.cfg.algorithm.fedrod.personal_init, counts)

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        load_params(model, payload.tensors)
        counts = torch.bincount(data.y_train.long(), minlength=model.num_classes).to(torch.float32)
        heads = self.personal_heads(model, personal, counts)
        hp = self.cfg.algorithm.fedrod
        loss_fn = fedrod_loss(HeadProbe(model), heads, counts, ce=hp.personal_ce, generic=hp.personal_generic)
        params = [*model.parameters(), *(p for pair in heads for p in pair)]
        loss, seen = local_sgd(model, data, ctx, self.cfg.train, loss_fn, params=params)
        return self.client_finish(model, payload, personal, data, ctx, loss, seen, residual_state(heads))

    # ------------------------------------------------- the same update, a cohort at a time
    def client_start(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                     data: ClientData, ctx: ClientContext) -> CohortExtras:
        """The generic weights into ``model``; the residual heads as trained extras, the log
        class counts (and, with ``personal_generic: received``, the received heads) as fixed."""
        load_params(model, payload.tensors)
        counts = torch.bincount(data.y_train.long(), minlength=model.num_classes).to(torch.float32)
        fixed: Params = {"log_counts": torch.log(counts)}
        if self.cfg.algorithm.fedrod.personal_generic == "received":
            for k, (w0, b0) in enumerate(received_heads(HeadProbe(model))):
                fixed[f"received.{k}.weight"], fixed[f"received.{k}.bias"] = w0, b0
        return CohortExtras(trained=residual_state(self.personal_heads(model, personal, counts)), fixed=fixed)

    def cohort_loss(self, out: CohortOutputs, y: torch.Tensor, w: torch.Tensor,
                    trained: Params, fixed: Params) -> torch.Tensor:
        """:func:`fedrod_loss` for C clients at once (:func:`personal_ce_logits`' three forms)."""
        hp = self.cfg.algorithm.fedrod

        def lin(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bcd,ckd->bck", f, weight) + bias.unsqueeze(0)  # (B, C, K)

        prior = fixed["log_counts"].unsqueeze(0)  # (1, C, K)
        bsm = tensor_sum(masked_ce(z + prior, y, w) for z in out.logits)
        personal = []
        for k, (z, f) in enumerate(zip(out.logits, out.features, strict=True)):
            wp, bp = trained[_phead_key(k, "weight")], trained[_phead_key(k, "bias")]
            if hp.personal_generic == "received":
                fk = f if hp.personal_ce == "backbone" else f.detach()
                personal.append(lin(fk, fixed[f"received.{k}.weight"] + wp, fixed[f"received.{k}.bias"] + bp))
            elif hp.personal_ce == "backbone":
                wg, bg = out.heads[k]
                personal.append(lin(f, wg.detach(), bg.detach()) + lin(f, wp, bp))
            else:
                personal.append(z.detach() + lin(f.detach(), wp, bp))
        return bsm + tensor_sum(masked_ce(zp, y, w) for zp in personal)

    def client_finish(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                      data: ClientData, ctx: ClientContext, loss: float, seen: int,
                      extras: Params | None = None) -> ClientOutput:
        """Upload the generic weights; the trained residual heads are the new personal state."""
        if extras is None:
            raise ValueError("FedRoD-EE's client_finish needs the trained residual heads (extras)")
        sd = model.state_dict()
        return ClientOutput(
            upload=Message(tensors={k: sd[k].detach().clone() for k in payload.tensors}),
            personal={k: v.detach().clone() for k, v in extras.items()},
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss},
        )

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """Generic weights, then W^G + W^P and b^G + b^P in every exit's final linear layer."""
        load_params(model, payload.tensors)
        load_summed_heads(model, personal)
