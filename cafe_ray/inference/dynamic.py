"""Dynamic inference: run each sample only as deep as its policy decides.

``predict_batch`` is the pure function that evaluation and serving share: it
advances the still-running samples stage by stage and counts, per sample, the
MACs of every stage and head it actually ran (the cascade cost).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _take(h, idx: torch.Tensor):  # noqa: ANN001, ANN202 - a tensor or a tuple of tensors
    if isinstance(h, tuple):
        return tuple(t[idx] for t in h)
    return h[idx]


@torch.no_grad()
def predict_batch(model: EarlyExitNet, x: torch.Tensor, policy: ExitPolicy, cost: ExitCost) -> Prediction:
    """Early-exit forward of a batch; samples that exit are not carried deeper.

    At every exit but the last it asks ``policy.decide(probs, k, m, macs_spent, cost)``
    (``should_exit`` unless a policy needs the cost, as learned ones do); a policy with
    ``uses_history = True`` is asked ``decide_history(probs_of_exits_0_to_k, k, m, macs_spent,
    cost)`` instead, the history shrinking with the batch.
    """
    model.eval()
    B = x.shape[0]
    m = model.num_exits
    labels = torch.zeros(B, dtype=torch.long)
    exits = torch.full((B,), m - 1, dtype=torch.long)
    conf = torch.zeros(B)
    macs = torch.zeros(B, dtype=torch.long)
    probs_out = torch.zeros(B, model.num_classes)
    active = torch.arange(B)  # indices into the batch still running
    h = x
    history: list[torch.Tensor] | None = [] if getattr(policy, "uses_history", False) else None
    for k in range(m):
        h = model.stages[k](h)
        z = model.exits[k](h)  # (A, C)
        p = z.softmax(dim=1)
        macs[active] += cost.stage_macs[k] + cost.head_macs[k]
        if k == m - 1:
            stop = torch.ones(len(active), dtype=torch.bool)
        elif history is not None:  # e.g. the learned cascade: every exit's probabilities so far
            history.append(p)
            stop = policy.decide_history(history, k, m, macs[active], cost)
        else:
            stop = policy.decide(p, k, m, macs[active], cost)
        done = active[stop]
        labels[done] = p[stop].argmax(dim=1)
        exits[done] = k
        conf[done] = p[stop].max(dim=1).values
        probs_out[done] = p[stop]
        keep = ~stop
        if not bool(keep.any()):
            break
        active = active[keep]
        h = _take(h, keep.nonzero(as_tuple=True)[0])
        if history is not None:
            history = [q[keep] for q in history]
    return Prediction(labels, exits, conf, macs, probs_out)
