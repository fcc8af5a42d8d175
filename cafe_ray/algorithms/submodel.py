"""Depth- and width-scaled sub-models of one early-exit network (DepthFL, ScaleFL).

A client trains a *sub-model*: the first k stages and their exits (k from the
device profile's ``max_depth``) of a network whose every tensor is a *prefix
slice* of the global one, t_sub = t_global[:s_0, :s_1, ...] (HeteroFL-style
width scaling keeps the first channels of every layer; a depth-only sub-model
has the global shapes). The server averages every *element* over the clients
that hold it, weighted by sample count; elements no participant holds this
round keep their value (:class:`PrefixMean`).

HeteroFL: Diao, Ding, Tarokh, "HeteroFL: Computation and Communication
Efficient Federated Learning for Heterogeneous Clients", ICLR 2021
(arXiv:2010.01264).

Downlink: the server learns a client's sub-model shapes (its "spec") from its
first upload and from then on sends only that slice; at first contact it sends
the whole global model and the client slices it (a device's profile is fixed,
so its spec is too). Evaluation and serving run the global model.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from cafe_ray.algorithms.base import (
    Algorithm,
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
    with_global,
)
from cafe_ray.algorithms.training import LossFn, local_sgd
from cafe_ray.models.base import EarlyExitNet, exit_of_key, stage_of_key


def depth_of(max_depth: int | None, num_exits: int) -> int:
    """The number of exits a device trains: ``max_depth`` clamped to [1, m] (None = m)."""
    if max_depth is None:
        return num_exits
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1 (or None for all exits), got {max_depth}")
    return min(int(max_depth), num_exits)


def prefix_keys(keys: Sequence[str], depth: int) -> list[str]:
    """The keys of stages 0..depth-1 and exits 0..depth-1 (order kept)."""
    out = []
    for k in keys:
        idx = stage_of_key(k)
        idx = exit_of_key(k) if idx is None else idx
        if idx is not None and idx < depth:
            out.append(k)
    return out


def prefix_index(small: Sequence[int], big: Sequence[int]) -> tuple[slice, ...]:
    """The index of a prefix slice of shape ``small`` inside shape ``big``; a ValueError if not one."""
    if len(small) != len(big) or any(s > b for s, b in zip(small, big, strict=True)):
        raise ValueError(f"shape {tuple(small)} is not a prefix slice of {tuple(big)}")
    return tuple(slice(0, s) for s in small)


def slice_prefix(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """t[:s_0, :s_1, ...] as a new contiguous tensor."""
    return t[prefix_index(shape, t.shape)].clone()


class PrefixMean:
    """Per-element weighted mean of prefix-sliced updates over the clients holding each element.

    ``like`` is the full-size reference (the current global model): elements no
    update covers keep its value, non-floating tensors are never averaged.
    """

    def __init__(self, like: Params) -> None:
        self._like = like
        self._sum: Params = {}
        self._weight: Params = {}

    def add(self, params: Params, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"aggregation weight must be >= 0, got {weight}")
        for k, v in params.items():
            if k not in self._like:
                raise KeyError(f"update key {k!r} is not in the global model")
            ref = self._like[k]
            if not torch.is_floating_point(ref):
                continue
            idx = prefix_index(v.shape, ref.shape)
            s = self._sum.setdefault(k, torch.zeros_like(ref, dtype=torch.float64))
            w = self._weight.setdefault(k, torch.zeros_like(ref, dtype=torch.float64))
            s[idx] += v.detach().to(torch.float64) * weight
            w[idx] += weight

    def result(self) -> Params:
        out = {k: v.clone() for k, v in self._like.items()}
        for k, s in self._sum.items():
            w = self._weight[k]
            ref = self._like[k]
            held = w > 0
            out[k] = torch.where(held, s / w.clamp_min(1e-300), ref.to(torch.float64)).to(ref.dtype)
        return out


class SubModelFL(Algorithm):
    """HeteroFL-style server and client loop; subclasses choose the sub-model and its loss."""

    personalized = False

    @abstractmethod
    def submodel(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[EarlyExitNet, int, int]:
        """(network to train, its width, its depth k); the network may be ``model`` itself."""

    @abstractmethod
    def loss_fn(self, depth: int, ctx: ClientContext) -> LossFn:
        """The local loss of a depth-k sub-model (it must only run exits 0..k-1)."""

    # ----------------------------------------------------------------- server
    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return with_global(ServerState(tensors={}, meta={"specs": {}, "client_spec": {}}), params)

    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        """The client's slice of the global model once its spec is known, else all of it."""
        full = global_params(state)
        specs, client_spec = state.meta.get("specs", {}), state.meta.get("client_spec", {})
        out: dict[int, Message] = {}
        for cid in ctx.participants:
            sid = client_spec.get(str(cid))
            if sid is None:
                out[cid] = Message(tensors=full)
            else:
                out[cid] = Message(tensors={k: slice_prefix(full[k], s) for k, s in specs[sid].items()},
                                   meta={"spec": sid})
        return out

    def aggregate(self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext) -> ServerState:
        """Per-element sample-weighted mean over the holders; record each client's spec."""
        if not results:
            return state
        old = global_params(state)
        mean = PrefixMean(old)
        specs = dict(state.meta.get("specs", {}))
        client_spec = dict(state.meta.get("client_spec", {}))
        for r in results:
            up = r.output.upload
            mean.add(up.tensors, float(r.output.num_samples))
            sid = up.meta.get("spec")
            if sid is not None:
                specs[sid] = {k: list(v.shape) for k, v in up.tensors.items()}
                client_spec[str(r.client_id)] = sid
        meta = {**state.meta, "specs": specs, "client_spec": client_spec}
        return with_global(ServerState(tensors=dict(state.tensors), meta=meta), mean.result())

    # ----------------------------------------------------------------- client
    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        """Slice the payload to the sub-model, train its depth-k prefix, upload that prefix."""
        net, width, depth = self.submodel(model, data, ctx)
        own = net.state_dict()
        keys = prefix_keys(list(own), depth)
        missing = [k for k in keys if k not in payload.tensors]
        if missing:
            raise KeyError(f"payload lacks {missing[:5]}: a depth-{depth} sub-model needs stages and exits 0..{depth - 1}")
        load_params(net, {k: slice_prefix(payload.tensors[k], own[k].shape) for k in keys})
        keyset = set(keys)
        trainable = [p for n, p in net.named_parameters() if n in keyset]
        loss, seen = local_sgd(net, data, ctx, self.cfg.train, self.loss_fn(depth, ctx), params=trainable)
        sd = net.state_dict()
        return ClientOutput(
            upload=Message(tensors={k: sd[k].detach().clone() for k in keys}, meta={"spec": f"w{width}_d{depth}"}),
            personal=None,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=depth,
            metrics={"train_loss": loss, "depth": float(depth), "width": float(width)},
        )
