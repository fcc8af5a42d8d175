"""Aggregation as pure functions over (params, weight) pairs.

The streaming weighted mean keeps one running sum, so memory does not grow with
the cohort; ``weighted_mean`` is the list reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cafe_ray.algorithms.base import Params


class StreamingMean:
    """Running weighted mean of parameter dicts (float64 accumulators).

    Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) keep the value
    of the first update: averaging counters is meaningless.
    """

    def __init__(self) -> None:
        self._sum: Params = {}
        self._other: Params = {}
        self.total_weight = 0.0

    def add(self, params: Params, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"aggregation weight must be >= 0, got {weight}")
        if self._sum or self._other:
            keys = set(self._sum) | set(self._other)
            if keys != set(params):
                raise KeyError(f"update keys differ from the first update: {sorted(keys ^ set(params))[:5]}")
        for k, v in params.items():
            if not torch.is_floating_point(v):
                self._other.setdefault(k, v.clone())
                continue
            acc = self._sum.get(k)
            if acc is None:
                self._sum[k] = v.detach().to(torch.float64) * weight  # a new tensor: ours to add into
            else:  # in place, promoted to float64 inside the kernel: one op per tensor, same bits
                acc.add_(v.detach(), alpha=weight)
        self.total_weight += weight

    def result(self, like: Params | None = None) -> Params:
        if self.total_weight <= 0:
            raise ValueError("no update with positive weight to aggregate")
        out: Params = {}
        for k, s in self._sum.items():
            dtype = like[k].dtype if like is not None and k in like else torch.float32
            out[k] = (s / self.total_weight).to(dtype)
        out.update(self._other)
        return out


def weighted_mean(updates: Iterable[tuple[Params, float]]) -> Params:
    """Reference (list) weighted mean; see :class:`StreamingMean`."""
    items = list(updates)
    total = sum(w for _, w in items)
    if total <= 0:
        raise ValueError("no update with positive weight to aggregate")
    keys = items[0][0].keys()
    out: Params = {}
    for k in keys:
        if not torch.is_floating_point(items[0][0][k]):
            out[k] = items[0][0][k].clone()
        else:
            out[k] = sum(p[k].to(torch.float64) * w for p, w in items).div(total).to(items[0][0][k].dtype)
    return out


def subtract(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a if torch.is_floating_point(a[k])}


def flatten(params: Params, keys: Iterable[str] | None = None) -> torch.Tensor:
    """Concatenate (floating) tensors in sorted key order as one float64 vector."""
    ks = sorted(keys if keys is not None else params)
    parts = [params[k].detach().reshape(-1).to(torch.float64) for k in ks if torch.is_floating_point(params[k])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
