"""Depth-wise interference: do an early-exit network's exits pull the shared stages apart?

CAFEDistill (arXiv:2601.10015) selects student exits because shallow and deep exits
may push the backbone stages they share in different directions. Whether they do
in a given setting is measurable: the cosine between exit k's and exit l's loss
gradients on the stages both read (stages 0..k for k < l). A cosine near 1 means
the exits agree, near 0 that they ignore each other, below 0 that they conflict.

Pure torch: the gradients are taken with ``torch.autograd.grad`` and never touch
``.grad``, so measuring before local training changes nothing in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cafe_ray.models.base import EarlyExitNet, stage_of_key


def stage_parameters(model: EarlyExitNet) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of every backbone stage, in stage order."""
    stages: list[list[torch.nn.Parameter]] = [[] for _ in range(model.num_exits)]
    for name, p in model.named_parameters():
        s = stage_of_key(name)
        if s is not None and p.requires_grad:
            stages[s].append(p)
    return stages


def exit_gradient_cosines(
    losses: Sequence[torch.Tensor], stages: Sequence[Sequence[torch.nn.Parameter]]
) -> dict[str, float]:
    """``grad_cos_k_l``: cos(dL_k/dtheta, dL_l/dtheta) over stages 0..k, for every exit pair k < l.

    ``losses[k]`` is exit k's loss (a scalar of one forward pass); ``stages[s]`` the
    parameters of stage s. A gradient that is zero on the shared stages gives 0.
    """
    m = len(losses)
    if m < 2:
        return {}
    if len(stages) < m - 1:
        raise ValueError(f"need the parameters of at least {m - 1} stages for {m} exits, got {len(stages)}")
    flat: list[list[torch.Tensor]] = []  # flat[k][s]: exit k's gradient on stage s (s <= k)
    for k, loss in enumerate(losses):
        params = [p for s in range(min(k + 1, len(stages))) for p in stages[s]]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        per_stage, i = [], 0
        for s in range(min(k + 1, len(stages))):
            n = len(stages[s])
            parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                     for g, p in zip(grads[i:i + n], stages[s], strict=True)]
            per_stage.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
            i += n
        flat.append(per_stage)
    out: dict[str, float] = {}
    for k in range(m - 1):
        a = torch.cat(flat[k][: k + 1])
        for j in range(k + 1, m):
            b = torch.cat(flat[j][: k + 1])
            na, nb = float(a.norm()), float(b.norm())
            out[f"grad_cos_{k}_{j}"] = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
    return out
