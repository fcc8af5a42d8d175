"""Dynamic inference: run each sample only as deep as its policy decides.

``predict_batch`` is the pure function that evaluation and serving share: it
advances the still-running samples stage by stage and counts, per sample, the
MACs of every stage and head it actually ran (the cascade cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

from cafe_ray.inference.policies import ExitPolicy
from cafe_ray.models import EarlyExitNet, ExitCost


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor  # (B,) int64
    exits: torch.Tensor  # (B,) int64, 0-based exit taken
    confidence: torch.Tensor  # (B,) max softmax probability at the exit taken
    macs: torch.Tensor  # (B,) int64, MACs spent on the sample
    probs: torch.Tensor  # (B, C) probabilities at the exit taken


Hidden = TypeVar("Hidden", torch.Tensor, tuple[torch.Tensor, ...])  # a stage's output


def _take(h: Hidden, idx: torch.Tensor) -> Hidden:
    if isinstance(h, tuple):
        return tuple(t[idx] for t in h)
    return h[idx]


@torch.no_grad()
def predict_batch(model: EarlyExitNet, x: torch.Tensor, policy: ExitPolicy, cost: ExitCost) -> Prediction:
    """Early-exit forward of a batch; samples that exit are not carried deeper.

    At every exit but the last it asks ``policy.decide(probs, k, m, macs_spent, cost)``
    (``should_exit`` unless a policy needs the cost, as learned ones do); a policy with
    ``uses_history = True`` is asked ``decide_history(probs_of_exits_0_to_k, k, m, macs_spent,
    cost)`` instead, the history shrinking with the batch. A policy with ``combines = True``
    answers with ``policy.combine(log_softmax_of_exits_0_to_k, k)`` at exit ``k`` (e.g. a learned
    combination of every exit so far): its decision, history and answer all read those logits.
    """
    model.eval()
    B = x.shape[0]
    m = model.num_exits
    cascade = cost.cascade  # every sample still running at exit k has spent cascade[k]
    # Answers are gathered per exit and scattered once at the end: serving runs this beside an
    # event loop, and every extra tensor op is one more wait for the GIL (docs/serving.md).
    done_idx: list[torch.Tensor] = []
    done_p: list[torch.Tensor] = []
    done_k: list[int] = []
    active: torch.Tensor | None = None  # indices into the batch still running; None = all
    h = x
    history: list[torch.Tensor] | None = [] if getattr(policy, "uses_history", False) else None
    raw: list[torch.Tensor] | None = [] if getattr(policy, "combines", False) else None
    for k in range(m):
        h = model.stages[k](h)
        z = model.exits[k](h)
        if raw is not None:  # the policy answers with a combination of exits 0..k
            raw.append(z.log_softmax(dim=1))
            z = policy.combine(raw, k)
        p = z.softmax(dim=1)  # (A, C)
        n = p.shape[0]
        if k == m - 1:
            stop = None
        else:
            spent = torch.full((n,), cascade[k], dtype=torch.long)
            if history is not None:  # e.g. the learned cascade: every exit's probabilities so far
                history.append(p)
                stop = policy.decide_history(history, k, m, spent, cost)
            else:
                stop = policy.decide(p, k, m, spent, cost)
            if bool(stop.all()):
                stop = None
        idx = torch.arange(B) if active is None else active
        if stop is None:  # every running sample exits here
            done_idx.append(idx)
            done_p.append(p)
            done_k.append(k)
            break
        if bool(stop.any()):
            done_idx.append(idx[stop])
            done_p.append(p[stop])
            done_k.append(k)
        keep = (~stop).nonzero(as_tuple=True)[0]
        active = idx[keep]
        h = _take(h, keep)
        if history is not None:
            history = [q[keep] for q in history]
        if raw is not None:
            raw = [q[keep] for q in raw]
    order = torch.cat(done_idx) if len(done_idx) > 1 else done_idx[0]
    probs_out = torch.empty(B, p.shape[1], dtype=p.dtype)
    probs_out[order] = torch.cat(done_p) if len(done_p) > 1 else done_p[0]
    exits = torch.empty(B, dtype=torch.long)
    exits[order] = torch.cat([torch.full((len(i),), k, dtype=torch.long) for i, k in zip(done_idx, done_k,
                                                                                      strict=True)])
    conf, labels = probs_out.max(dim=1)
    macs = torch.tensor(cascade, dtype=torch.long)[exits]
    return Prediction(labels, exits, conf, macs, probs_out)
