"""Parameter dicts backed by one flat buffer per dtype.

Messages cross process boundaries as a few numpy buffers (Ray ships those out of
band, without pickling a tensor at a time), and come back as :class:`FlatParams`:
a read-only ``name -> tensor`` mapping whose tensors are views of those buffers, so
that :class:`~cafe_ray.algorithms.aggregation.StreamingMean` can fold a whole update
with one kernel instead of one per tensor. Algorithms read it like a plain dict.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# (name, dtype key, offset within that dtype's region, shape), in the dict's key order
Layout = tuple[tuple[str, str, int, tuple[int, ...]], ...]
# what travels: the layout and where each dtype's region starts in the shared buffers
Wire = tuple[Layout, dict[str, int]]


class FlatParams(Mapping[str, torch.Tensor]):
    """A read-only ``name -> tensor`` mapping over ``flat`` (one 1-D tensor per dtype).

    ``layout`` says where each tensor lies; two FlatParams with equal layouts hold the same
    tensors at the same places, so their buffers can be added as wholes. The per-tensor
    views are made on first access: an aggregation that sums whole buffers never pays
    for them (a torch view costs microseconds, times tensors, times clients, every round).
    """

    def __init__(self, flat: dict[str, torch.Tensor], layout: Layout, plan: _Plan | None = None) -> None:
        self.flat, self.layout = flat, layout
        self._plan = plan if plan is not None else _plan(layout)
        self._views: dict[str, torch.Tensor] | None = None

    def _materialize(self) -> dict[str, torch.Tensor]:
        if self._views is None:
            views: dict[str, torch.Tensor] = {}
            for dt, names, sizes, shapes, _ in self._plan.groups:
                for name, piece, shape in zip(names, torch.split(self.flat[dt], list(sizes)), shapes, strict=True):
                    views[name] = piece.view(shape)
            self._views = {k: views[k] for k in self._plan.names}  # the sender's key order
        return self._views

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan.names)

    def __len__(self) -> int:
        return len(self._plan.names)

    def __contains__(self, key: object) -> bool:
        return key in self._plan.name_set

    def __repr__(self) -> str:
        return f"FlatParams({', '.join(self._plan.names)})"

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.flat.values()))


@dataclass(frozen=True)
class _Plan:
    """A layout grouped by dtype, computed once per distinct layout."""

    groups: tuple[tuple[str, tuple[str, ...], tuple[int, ...], tuple[tuple[int, ...], ...], int], ...]
    names: tuple[str, ...]
    name_set: frozenset[str]


_PLANS: dict[Layout, _Plan] = {}


def _plan(layout: Layout) -> _Plan:
    plan = _PLANS.get(layout)
    if plan is None:
        by_dt: dict[str, list[tuple[str, str, int, tuple[int, ...]]]] = {}
        for entry in layout:
            by_dt.setdefault(entry[1], []).append(entry)
        groups = []
        for dt, entries in by_dt.items():
            entries.sort(key=lambda e: e[2])
            sizes = tuple(math.prod(e[3]) for e in entries)
            groups.append((dt, tuple(e[0] for e in entries), sizes, tuple(e[3] for e in entries), sum(sizes)))
        plan = _Plan(tuple(groups), tuple(e[0] for e in layout), frozenset(e[0] for e in layout))
        if len(_PLANS) > 256:  # layouts are few (one per algorithm message kind); bound it anyway
            _PLANS.clear()
        _PLANS[layout] = plan
    return plan


def pack_many(items: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[Wire], dict[str, np.ndarray]]:
    """Several parameter dicts into one numpy buffer per dtype (a copy): one wire layout per
    dict. Dicts with the same structure share one layout object (pickled once)."""
    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    interned: dict[Layout, Layout] = {}
    wires: list[Wire] = []
    for params in items:
        layout = []
        starts: dict[str, int] = {}
        local: dict[str, int] = {}
        for k, v in params.items():
            t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            dt = str(t.dtype)
            if dt not in starts:
                starts[dt] = sizes.get(dt, 0)
            off = local.get(dt, 0)
            n = t.numel()
            parts.setdefault(dt, []).append(t.reshape(-1))
            local[dt] = off + n
            sizes[dt] = sizes.get(dt, 0) + n
            layout.append((k, dt, off, tuple(t.shape)))
        lay = tuple(layout)
        wires.append((interned.setdefault(lay, lay), starts))
    buffers = {dt: torch.cat(ps).cpu().numpy() for dt, ps in parts.items()}
    return wires, buffers


def to_buffers(params: Mapping[str, torch.Tensor]) -> tuple[Wire, dict[str, np.ndarray]]:
    """One contiguous numpy buffer per dtype (a copy) and where each tensor lies in it."""
    wires, buffers = pack_many([params])
    return wires[0], buffers


def from_buffers(wire: Wire, buffers: Mapping[str, np.ndarray | torch.Tensor], copy: bool = False) -> FlatParams:
    """Inverse of :func:`to_buffers` / :func:`pack_many`: views, no copy unless ``copy``
    (object-store memory is read-only; a receiver that may write into what it got asks for
    its own copy)."""
    layout, starts = wire
    plan = _plan(layout)
    regions: dict[str, torch.Tensor] = {}
    for dt, _, _, _, total in plan.groups:
        buf = buffers[dt]
        if not isinstance(buf, torch.Tensor):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch warns once about read-only numpy arrays
                buf = torch.from_numpy(buf)
        region = buf[starts[dt]:starts[dt] + total]
        regions[dt] = region.clone() if copy else region
    return FlatParams(regions, layout, plan)
