"""Vectorized client cohorts: the local SGD of many clients as one batched computation.

FedJAX's ``for_each_client`` idea: the algorithm says *what* a client does
(``client_start``, local SGD of every parameter on the sum of per-exit
cross-entropies, ``client_finish``); the backend decides *how*. Here a cohort of
clients with the same architecture trains together: their parameters are
stacked along a new leading dimension and ``torch.func.vmap`` runs
``functional_call`` + ``grad`` over that dimension, so one batched kernel call
replaces one small call per client. Each client keeps its own batches (the
same seeded permutations as :func:`cafe_ray.algorithms.training.local_sgd`),
its own momentum buffer, and a mask that freezes it once its data runs out
(fewer samples or steps than the others).

Results equal the per-client path up to float rounding (batched kernels sum in
another order) and are deterministic for a given cohort.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.base import ClientContext, ClientData
from cafe_ray.algorithms.training import client_generator, tensor_sum
from cafe_ray.config import TrainConfig
from cafe_ray.models.base import EarlyExitNet

Params = dict[str, torch.Tensor]


def can_vectorize(model: EarlyExitNet) -> str | None:
    """None if ``model`` can train as a cohort, else why not (buffers would be shared)."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({buffers[:3]}) that a cohort would share"
    return None


def _batches(data: ClientData, ctx: ClientContext, train: TrainConfig) -> list[torch.Tensor]:
    """The index batches ``local_sgd`` would draw for this client, in order."""
    n = data.num_train
    if n == 0:
        return []
    gen = client_generator(ctx, 0)
    out: list[torch.Tensor] = []
    for _ in range(train.local_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, train.batch_size):
            out.append(order[start:start + train.batch_size])
            if train.max_steps is not None and len(out) >= train.max_steps:
                return out
    return out


def cohort_sgd(model: EarlyExitNet, starts: Sequence[Params], datas: Sequence[ClientData],
               ctxs: Sequence[ClientContext], train: TrainConfig) -> list[tuple[Params, float, int]]:
    """Local SGD (momentum, weight decay) of every client from its start parameters, batched.

    Returns per client (trained parameters, mean training loss, samples processed),
    as ``local_sgd`` would for that client alone.
    """
    from torch.func import functional_call, grad_and_value, vmap

    why = can_vectorize(model)
    if why:
        raise ValueError(f"engine.vectorize: {why}; set engine.vectorize=false for this model")
    names = [n for n, _ in model.named_parameters()]
    C = len(starts)
    P = {n: torch.stack([s[n].detach() for s in starts]) for n in names}
    buf = {n: torch.zeros_like(p) for n, p in P.items()}
    plans = [_batches(d, c, train) for d, c in zip(datas, ctxs, strict=True)]
    steps = max((len(p) for p in plans), default=0)
    B = train.batch_size
    x0 = datas[0].x_train
    totals = [0.0] * C
    seen = [0] * C

    def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        outs = functional_call(model, params, (x,))
        denom = w.sum().clamp_min(1.0)
        return tensor_sum((F.cross_entropy(z, y, reduction="none") * w).sum() / denom for z in outs)

    step_fn = vmap(grad_and_value(loss_fn))
    model.train()
    for s in range(steps):
        dev = x0.device  # the runner's device: batches are built where the cohort trains
        X = torch.zeros((C, B, *x0.shape[1:]), dtype=x0.dtype, device=dev)
        Y = torch.zeros((C, B), dtype=torch.int64, device=dev)
        W = torch.zeros((C, B), dtype=torch.float32, device=dev)
        active = torch.zeros(C, dtype=torch.bool, device=dev)
        for c, plan in enumerate(plans):
            if s < len(plan):
                idx = plan[s]
                k = len(idx)
                X[c, :k] = datas[c].x_train[idx]
                Y[c, :k] = datas[c].y_train[idx]
                W[c, :k] = 1.0
                active[c] = True
        grads, losses = step_fn(P, X, Y, W)
        with torch.no_grad():
            for n in names:
                g = grads[n]
                if train.weight_decay:
                    g = g + train.weight_decay * P[n]
                new_buf = train.momentum * buf[n] + g if train.momentum else g
                mask = active.view(C, *([1] * (P[n].dim() - 1)))
                buf[n] = torch.where(mask, new_buf, buf[n])
                P[n] = torch.where(mask, P[n] - train.lr * new_buf, P[n])
        for c in range(C):
            if active[c]:
                k = len(plans[c][s])
                totals[c] += float(losses[c]) * k
                seen[c] += k
    return [({n: P[n][c].clone() for n in names}, totals[c] / max(seen[c], 1), seen[c]) for c in range(C)]


DEFAULT_COHORT = 16  # clients per cohort when engine.vectorize is on and engine.chunk_clients is unset


def cohort_size(chunk_clients: int | None) -> int:
    return chunk_clients or DEFAULT_COHORT


def even_runs(idx: Sequence[int], size: int) -> list[list[int]]:
    """``idx`` in consecutive runs of at most ``size``, as few as that allows and as even as
    possible (50 at 16: 13, 13, 12, 12, not 16, 16, 16, 2, which leaves one actor twice the
    work of the other)."""
    n = len(idx)
    if n == 0:
        return []
    k = -(-n // max(size, 1))
    base, extra = divmod(n, k)
    out, start = [], 0
    for r in range(k):
        end = start + base + (r < extra)
        out.append(list(idx[start:end]))
        start = end
    return out


def split_cohorts(jobs: Sequence, size: int, class_of: Mapping[int, str] | None = None) -> list[list[int]]:
    """Job indices in cohorts: consecutive jobs of one resource class, at most ``size`` at a time,
    in even runs (:func:`even_runs`).

    The same on every executor and for any number of actors, so vectorized
    results never depend on how the work is spread.
    """
    by_class: dict[object, list[int]] = {}
    for i, j in enumerate(jobs):
        key = class_of.get(j.client_id) if class_of is not None else None
        by_class.setdefault(key, []).append(i)
    out: list[list[int]] = []
    for idx in by_class.values():
        out.extend(even_runs(idx, size))
    return out
