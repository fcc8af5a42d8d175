"""Aggregation as pure functions over (params, weight) pairs.

The streaming weighted mean keeps one running sum, so memory does not grow with
the cohort; ``weighted_mean`` is the list reference it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cafe_ray.algorithms.base import Params
from cafe_ray.algorithms.flat import FlatParams, Layout


class StreamingMean:
    """Running weighted mean of parameter dicts (float64 accumulators).

    Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) keep the value
    of the first update: averaging counters is meaningless.

    Updates that arrive as :class:`~cafe_ray.algorithms.flat.FlatParams` of one floating
    dtype (what the Ray executor hands over) are summed as whole buffers: one kernel per
    update instead of one per tensor, the same float64 arithmetic element by element, so
    the same bits as the per-tensor sum.
    """

    def __init__(self) -> None:
        self._sum: Params = {}
        self._other: Params = {}
        self._flat: torch.Tensor | None = None  # the float64 sum of flat updates
        self._layout: Layout = ()
        self._names: frozenset[str] = frozenset()  # the keys of a flat mean's layout
        self.total_weight = 0.0

    def _flat_of(self, params: Params) -> torch.Tensor | None:
        """``params`` as one vector in this mean's layout, when it can be summed as one."""
        if isinstance(params, FlatParams) and params.layout == self._layout:
            return next(iter(params.flat.values()))
        if set(params) != self._names:
            return None
        return torch.cat([params[e[0]].detach().reshape(-1) for e in self._layout])

    def add(self, params: Params, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"aggregation weight must be >= 0, got {weight}")
        if self._flat is not None:
            vec = self._flat_of(params)
            if vec is None:
                raise KeyError(f"update keys differ from the first update: {sorted(self._names ^ set(params))[:5]}")
            self._flat.add_(vec, alpha=weight)
            self.total_weight += weight
            return
        if not (self._sum or self._other) and _one_float_buffer(params):
            assert isinstance(params, FlatParams)
            self._layout, self._names = params.layout, frozenset(params)
            self._flat = next(iter(params.flat.values())).to(torch.float64) * weight
            self.total_weight += weight
            return
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
        if self._flat is not None:
            mean = self._flat / self.total_weight
            dtypes = {like[e[0]].dtype if like is not None and e[0] in like else torch.float32
                      for e in self._layout}
            whole = mean.to(dtypes.pop()) if len(dtypes) == 1 else None
            for name, _, off, shape in self._layout:
                n = math.prod(shape)
                if whole is not None:
                    out[name] = whole[off:off + n].view(shape)
                else:
                    dtype = like[name].dtype if like is not None and name in like else torch.float32
                    out[name] = mean[off:off + n].view(shape).to(dtype)
            return out
        for k, s in self._sum.items():
            dtype = like[k].dtype if like is not None and k in like else torch.float32
            out[k] = (s / self.total_weight).to(dtype)
        out.update(self._other)
        return out


def _one_float_buffer(params: Params) -> bool:
    """A flat update whose tensors all share one floating dtype (one buffer to sum)."""
    if not isinstance(params, FlatParams) or len(params.flat) != 1:
        return False
    return torch.is_floating_point(next(iter(params.flat.values())))


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
