"""Vectorized client cohorts: the local SGD of many clients as one batched computation.

FedJAX's ``for_each_client`` idea: the algorithm says *what* a client does
(``client_start``, local SGD on the loss ``cohort_loss`` computes, ``client_finish``);
the backend decides *how*. Here a cohort of clients with the same architecture
trains together. A CNN's cohort is one C-times-wider network of grouped kernels
(:mod:`cafe_ray.sim.wide`); other models stack their parameters along a new leading
dimension and ``torch.func.vmap`` runs ``functional_call`` + ``grad`` over it (the
default loss only). Either way one batched kernel call replaces one small call per
client. Each client keeps its own batches (the same seeded permutations as
:func:`cafe_ray.algorithms.training.local_sgd`), its own momentum buffer, and is
frozen once its data runs out (fewer samples or steps than the others).

Results equal the per-client path up to float rounding (batched kernels sum in
another order) and are deterministic for a given cohort.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cafe_ray.algorithms.base import ClientContext, ClientData, CohortExtras, CohortOutputs
from cafe_ray.algorithms.training import client_generator, tensor_sum
from cafe_ray.config import TrainConfig
from cafe_ray.models.base import EarlyExitNet

Params = dict[str, torch.Tensor]


def can_vectorize(model: EarlyExitNet, wide: bool = False) -> str | None:
    """None if ``model`` can train as a cohort (``wide``: as a grouped-kernel one), else why not."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({buffers[:3]}) that a cohort would share"
    if wide:
        from cafe_ray.sim.wide import widen

        return widen(model, 2)[1]
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


# per client: (trained parameters, mean training loss, samples processed, trained extras)
CohortResult = list[tuple[Params, float, int, Params]]
CohortLoss = Callable[[CohortOutputs, torch.Tensor, torch.Tensor, Params, Params], torch.Tensor]
WideCache = dict[int, tuple[EarlyExitNet | None, str | None]]


def wide_network(model: EarlyExitNet, starts: Sequence[Params], probe: torch.Tensor | None,
                 cache: WideCache) -> tuple[EarlyExitNet | None, str | None]:
    """The C-wide network for this cohort size (built and checked once), or why there is none."""
    from cafe_ray.sim import wide as w

    C = len(starts)
    if C not in cache:
        net, why = w.widen(model, C)
        if net is not None and probe is not None and probe.shape[0]:
            why = w.check_wide(model, net, starts, probe[:2])
        cache[C] = (net if why is None else None, why)
    return cache[C]


def cohort_sgd(model: EarlyExitNet, starts: Sequence[Params], datas: Sequence[ClientData],
               ctxs: Sequence[ClientContext], train: TrainConfig, wides: WideCache | None = None,
               loss: CohortLoss | None = None, extras: Sequence[CohortExtras | None] | None = None) -> CohortResult:
    """Local SGD (momentum, weight decay) of every client from its start parameters, batched.

    Returns per client what ``local_sgd`` would for that client alone, plus its trained
    extras. Models whose layers all have a grouped form train as one wide network
    (:mod:`cafe_ray.sim.wide`), with the algorithm's ``loss`` and ``extras``; others under
    ``vmap``, with the default loss only. ``wides`` caches the wide network per cohort size.
    """
    net, why = wide_network(model, starts, datas[0].x_train, wides if wides is not None else {})
    if net is not None:
        return wide_sgd(model, net, starts, datas, ctxs, train, loss, extras)
    if loss is not None or any(e is not None for e in extras or []):
        raise ValueError(f"this algorithm's batched loss needs the grouped-kernel cohort, and {why}")
    return vmap_sgd(model, starts, datas, ctxs, train)


def _plans(datas: Sequence[ClientData], ctxs: Sequence[ClientContext], train: TrainConfig) -> list[list[torch.Tensor]]:
    return [_batches(d, c, train) for d, c in zip(datas, ctxs, strict=True)]


def _step_batch(plans: Sequence[Sequence[torch.Tensor]], datas: Sequence[ClientData], s: int,
                B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``s`` of every client, (C, B, ...): inputs, labels and 1/0 weights (real sample /
    padding, for a shorter batch or a client whose batches ran out), on the data's device."""
    x0 = datas[0].x_train
    C = len(plans)
    X = torch.zeros((C, B, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
    Y = torch.zeros((C, B), dtype=torch.int64, device=x0.device)
    W = torch.zeros((C, B), dtype=torch.float32, device=x0.device)
    for c, plan in enumerate(plans):
        if s < len(plan):
            idx = plan[s]
            k = len(idx)
            X[c, :k] = datas[c].x_train[idx]
            Y[c, :k] = datas[c].y_train[idx]
            W[c, :k] = 1.0
    return X, Y, W


def _stack(parts: Sequence[Params]) -> Params:
    return {n: torch.stack([p[n] for p in parts]) for n in parts[0]} if parts else {}


def wide_sgd(model: EarlyExitNet, wide: EarlyExitNet, starts: Sequence[Params], datas: Sequence[ClientData],
             ctxs: Sequence[ClientContext], train: TrainConfig, loss: CohortLoss | None = None,
             extras: Sequence[CohortExtras | None] | None = None) -> CohortResult:
    """:func:`cohort_sgd` on the wide network: plain autograd, one optimizer over the stacked
    parameters and extras (SGD is elementwise, so it is each client's SGD); a client whose
    batches ran out keeps its parameters and momentum (restored after the shared step)."""
    from cafe_ray.algorithms.batched import cohort_exit_ce
    from cafe_ray.algorithms.sgd import SGD
    from cafe_ray.sim import wide as w

    C = len(starts)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    w.load_cohort(wide, starts)
    given = [e if e is not None else CohortExtras() for e in (extras or [None] * C)]
    trained = {n: t.detach().clone().requires_grad_(True) for n, t in _stack([e.trained for e in given]).items()}
    fixed = {n: t.detach() for n, t in _stack([e.fixed for e in given]).items()}
    views = [(p, shapes[n]) for n, p in wide.named_parameters()] + [(t, t.shape[1:]) for t in trained.values()]
    opt = SGD([v for v, _ in views], lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    plans = _plans(datas, ctxs, train)
    steps = max((len(p) for p in plans), default=0)
    x0 = datas[0].x_train
    counts = torch.zeros((steps, C))
    for c, plan in enumerate(plans):
        for s, idx in enumerate(plan):
            counts[s, c] = len(idx)
    counts_dev = counts.to(x0.device)
    totals = torch.zeros(C, device=x0.device)  # summed where the cohort trains: no sync per step
    probe = w.WideProbe(model, wide, C)
    wide.train()
    for s in range(steps):
        X, Y, W = _step_batch(plans, datas, s, train.batch_size)
        X, Y, W = X.transpose(0, 1).flatten(1, 2), Y.t(), W.t()  # (B, C*channels, ...), (B, C)
        opt.zero_grad()
        out = probe(X)
        # (C,): each client's loss, as local_sgd computes it
        per_client = loss(out, Y, W, trained, fixed) if loss is not None else cohort_exit_ce(out.logits, Y, W)
        per_client.sum().backward()
        idle = (counts[s] == 0).nonzero().flatten().tolist()
        saved = [(p.detach().view(C, *shape)[idle].clone(), None if b is None else b.view(C, *shape)[idle].clone())
                 for (p, shape), b in zip(views, opt.momentum_buffers, strict=True)] if idle else []
        opt.step()
        with torch.no_grad():
            for (p, shape), (old_p, old_b), buf in zip(views, saved, opt.momentum_buffers, strict=False):
                p.view(C, *shape)[idle] = old_p
                if buf is not None:
                    buf.view(C, *shape)[idle] = 0.0 if old_b is None else old_b
        totals += per_client.detach() * counts_dev[s]
    seen, totals = counts.sum(0), totals.cpu()
    return [(w.client_params(wide, shapes, c, C), float(totals[c]) / max(float(seen[c]), 1.0), int(seen[c]),
             {n: t.detach()[c].clone() for n, t in trained.items()}) for c in range(C)]


def vmap_sgd(model: EarlyExitNet, starts: Sequence[Params], datas: Sequence[ClientData],
             ctxs: Sequence[ClientContext], train: TrainConfig) -> CohortResult:
    """:func:`cohort_sgd` under ``torch.func.vmap`` (any layer type, slower per step)."""
    from torch.func import functional_call, grad_and_value, vmap

    why = can_vectorize(model)
    if why:
        raise ValueError(f"engine.vectorize: {why}; set engine.vectorize=false for this model")
    names = [n for n, _ in model.named_parameters()]
    C = len(starts)
    P = {n: torch.stack([s[n].detach() for s in starts]) for n in names}
    buf = {n: torch.zeros_like(p) for n, p in P.items()}
    plans = _plans(datas, ctxs, train)
    steps = max((len(p) for p in plans), default=0)
    B = train.batch_size
    totals = [0.0] * C
    seen = [0] * C

    def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        outs = functional_call(model, params, (x,))
        denom = w.sum().clamp_min(1.0)
        return tensor_sum((F.cross_entropy(z, y, reduction="none") * w).sum() / denom for z in outs)

    step_fn = vmap(grad_and_value(loss_fn))
    model.train()
    for s in range(steps):
        X, Y, W = _step_batch(plans, datas, s, B)
        active = W[:, 0] > 0  # a client with a batch at this step has at least its first row
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
    return [({n: P[n][c].clone() for n in names}, totals[c] / max(seen[c], 1), seen[c], {}) for c in range(C)]


class AutoVectorize:
    """``engine.vectorize: auto``: an actor's first cohorts alternate batched and per-client,
    then the faster stays.

    Order: batched, per-client, batched, per-client, batched, per-client. The first of each
    is a warm-up (the wide network is built and checked; first-call allocations) and not
    compared; of the other two each, the faster per trained sample counts, and batched must
    beat per-client by ``margin`` (per-client is the reference path, so noise keeps it).
    Timings are given, not taken, so the rule is testable on any numbers.
    """

    PROBES = 3  # calls each way, the first of them a warm-up

    def __init__(self, margin: float = 0.05) -> None:
        self.margin = margin
        self.vec: list[float] = []  # seconds per trained sample, in call order
        self.plain: list[float] = []
        self.choice: bool | None = None

    def next_vectorized(self) -> bool:
        """Whether the next cohort trains batched."""
        if self.choice is not None:
            return self.choice
        return len(self.vec) <= len(self.plain)

    def record(self, vectorized: bool, seconds: float, samples: int) -> None:
        if self.choice is not None:
            return
        (self.vec if vectorized else self.plain).append(seconds / max(samples, 1))
        if len(self.vec) >= self.PROBES and len(self.plain) >= self.PROBES:
            self.choice = min(self.vec[1:]) < (1.0 - self.margin) * min(self.plain[1:])

    def describe(self) -> str:
        """What auto chose and why, for the run's worker record."""
        if self.choice is None:
            return "auto: measuring"
        vec, plain = min(self.vec[1:]), min(self.plain[1:])
        ratio = plain / vec if vec > 0 else float("inf")
        return f"auto: {'on' if self.choice else 'off'} (batched {ratio:.2f}x the per-client speed)"


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


def cohort_runs(idx: Sequence[int], size: int, work: Callable[[int], float] | None = None) -> list[list[int]]:
    """:func:`even_runs` of ``idx`` taken in order of each job's local work (``work(i)``, ties
    by position): a cohort trains as many steps as its longest member, the others' rows
    padding, so cohorts of clients with about as many steps waste the least."""
    order = sorted(idx, key=lambda i: (work(i), i)) if work is not None else list(idx)
    return even_runs(order, size)


def split_cohorts(jobs: Sequence, size: int, class_of: Mapping[int, str] | None = None,
                  work: Callable[[Any], float] | None = None) -> list[list[int]]:
    """Job indices in cohorts: jobs of one resource class, at most ``size`` at a time, in
    order of their local work (``work(job)``) and in even runs (:func:`cohort_runs`).

    The same on every executor and for any number of actors, so vectorized
    results never depend on how the work is spread.
    """
    by_class: dict[object, list[int]] = {}
    for i, j in enumerate(jobs):
        key = class_of.get(j.client_id) if class_of is not None else None
        by_class.setdefault(key, []).append(i)
    out: list[list[int]] = []
    for idx in by_class.values():
        out.extend(cohort_runs(idx, size, (lambda i: work(jobs[i])) if work is not None else None))
    return out
