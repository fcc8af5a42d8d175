"""The algorithm interface: plain PyTorch + numpy, explicit state, no Ray.

An algorithm says which parameters are shared and which personal, what the server
sends each participant (``server_payloads``), what a client does with it
(``client_update``), and how the server folds the uploads back
(``aggregate``). Everything that crosses the network is a :class:`Message`, so the
Ray layer can count bytes without knowing what the tensors mean.

The execution layer (cafe_ray.sim) guarantees:
- ``model`` handed to ``client_update``/``load_for_eval`` is freshly reset to the
  experiment's deterministic initial weights (same on every client);
- ``personal`` is what this client's last ``client_update`` returned, or None if
  the client never trained;
- results reach ``aggregate`` sorted by client id.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from cafe_ray.config import ExperimentConfig
from cafe_ray.models.base import EarlyExitNet

if TYPE_CHECKING:
    from cafe_ray.data.base import ArrayDataset, ClientSplit

Params = dict[str, torch.Tensor]  # parameter/buffer name -> tensor (a partial state_dict)


def params_nbytes(params: Params) -> int:
    nbytes = getattr(params, "nbytes", None)  # FlatParams: its buffers' size, without a view per tensor
    if isinstance(nbytes, int):
        return nbytes
    return int(sum(t.numel() * t.element_size() for t in params.values()))


@dataclass(frozen=True)
class Message:
    """What crosses the network: tensors (their bytes are counted) and small metadata."""

    tensors: Params = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able, a few bytes, not counted

    @property
    def nbytes(self) -> int:
        return params_nbytes(self.tensors)


@dataclass
class ServerState:
    """Everything the server keeps between rounds: checkpointed as safetensors + JSON."""

    tensors: Params  # namespaced keys, e.g. "global/stages.0.conv.weight"
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able


@dataclass(frozen=True)
class RoundContext:
    """Server-side facts of round t, identical on every executor."""

    round: int  # t, 0-based
    num_rounds: int  # T
    seed: int  # derived from (experiment seed, t)
    participants: tuple[int, ...]  # P_t, sorted client ids


@dataclass(frozen=True)
class ClientContext:
    """Client-side facts: whose data, which round, which seed."""

    client_id: int
    round: int
    num_rounds: int
    seed: int  # derived from (experiment seed, t, client id)
    max_depth: int | None = None  # deepest exit (1-based count) the device may train; None = all
    width_factor: float = 1.0  # channel-width fraction of the sub-model the device trains (ScaleFL)


@dataclass(frozen=True)
class ClientData:
    """One client's local data as tensors (already gathered from the shared arrays)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None  # the client's validation split (data.val_fraction), if any
    y_val: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @classmethod
    def gather(cls, ds: ArrayDataset, split: ClientSplit) -> ClientData:
        """Client ``split``'s rows of the shared arrays, copied into contiguous tensors (its
        validation rows come from the training arrays)."""

        def rows(a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[idx]))

        has_val = len(split.val_idx) > 0
        return cls(
            x_train=rows(ds.x_train, split.train_idx), y_train=rows(ds.y_train, split.train_idx),
            x_test=rows(ds.x_test, split.test_idx), y_test=rows(ds.y_test, split.test_idx),
            x_val=rows(ds.x_train, split.val_idx) if has_val else None,
            y_val=rows(ds.y_train, split.val_idx) if has_val else None,
        )


@dataclass(frozen=True)
class ClientOutput:
    """What ``client_update`` returns."""

    upload: Message  # goes to the server (bytes counted)
    personal: Params | None  # the client's new personal state (stays on the client)
    num_samples: int  # local training set size (aggregation weight)
    samples_processed: int  # forward/backward sample passes (virtual compute time)
    trained_depth: int  # deepest exit trained, 1-based (virtual compute time)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """A client's output as the server sees it, tagged with its id."""

    client_id: int
    output: ClientOutput


@dataclass(frozen=True)
class CohortExtras:
    """What a client's batched local step needs beside the model's weights: tensors trained
    with the model (same SGD settings; e.g. FedRoD's residual heads) and fixed ones (e.g.
    its label prior). The engine stacks every cohort member's along a new first dimension."""

    trained: Params = field(default_factory=dict)
    fixed: Params = field(default_factory=dict)


@dataclass(frozen=True)
class CohortOutputs:
    """A cohort's forward pass, C clients at once: per exit, the logits (B, C, K); f_k, the
    input of the exit's final linear layer (B, C, D); and that layer's live weight (C, K, D)
    and bias (C, K)."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]
    heads: list[tuple[torch.Tensor, torch.Tensor]]


class Algorithm(ABC):
    """Base of every FL algorithm; subclasses register with :func:`register`."""

    name: ClassVar[str] = ""
    personalized: ClassVar[bool] = False  # True if evaluation uses personal parameters
    # True only where the class itself promises that client_update is exactly
    # client_start; local_sgd(every parameter and the extras' trained tensors, the loss
    # cohort_loss computes for a batch); client_finish, so that an executor may run the
    # local SGD of many clients as one batched computation (engine.vectorize). Not
    # inherited: a subclass that changes the update must opt in again.
    vectorizable: ClassVar[bool] = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def supports_vectorize(cls) -> bool:
        """Whether this very class (not a parent) declares ``vectorizable = True``."""
        return bool(cls.__dict__.get("vectorizable", False))

    def client_start(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                     data: ClientData, ctx: ClientContext) -> CohortExtras | None:
        """Vectorizable algorithms: put the weights local training starts from into ``model``;
        return the client's extras when its loss needs more than the model."""
        raise NotImplementedError(f"{self.name} does not support engine.vectorize")

    def cohort_loss(self, out: CohortOutputs, y: torch.Tensor, w: torch.Tensor,
                    trained: Params, fixed: Params) -> torch.Tensor:
        """Vectorizable algorithms: each client's batch loss, (C,), from a cohort's forward.

        ``y`` (B, C) labels, ``w`` (B, C) 1 for a real sample, 0 for padding (a client whose
        batch is shorter); ``trained``/``fixed``: the clients' extras stacked (C, ...). The
        default is the sum over exits of each client's mean cross-entropy (``sum_exit_ce``).
        """
        from cafe_ray.algorithms.batched import cohort_exit_ce

        return cohort_exit_ce(out.logits, y, w)

    def client_finish(self, model: EarlyExitNet, payload: Message, personal: Params | None,
                      data: ClientData, ctx: ClientContext, loss: float, seen: int,
                      extras: Params | None = None) -> ClientOutput:
        """Vectorizable algorithms: the output, from ``model`` (and the trained extras) after
        local training."""
        raise NotImplementedError(f"{self.name} does not support engine.vectorize")

    # ----------------------------------------------------------------- server
    @abstractmethod
    def init_server_state(self, model: EarlyExitNet) -> ServerState:
        """State before round 0, from the deterministic initial model."""

    @abstractmethod
    def server_payloads(self, state: ServerState, ctx: RoundContext) -> dict[int, Message]:
        """One message per participant in ``ctx.participants``."""

    @abstractmethod
    def aggregate(
        self, state: ServerState, results: Sequence[ClientResult], ctx: RoundContext
    ) -> ServerState:
        """Fold the successful clients' uploads (sorted by id) into the next state."""

    # ----------------------------------------------------------------- client
    @abstractmethod
    def client_update(
        self,
        model: EarlyExitNet,
        payload: Message,
        personal: Params | None,
        data: ClientData,
        ctx: ClientContext,
    ) -> ClientOutput:
        """Local training of one client in one round."""

    # ------------------------------------------------------------- evaluation
    def eval_payload(self, state: ServerState) -> Message:
        """What an evaluator needs from the server (not counted as traffic)."""
        return Message(tensors=global_params(state))

    def load_for_eval(
        self,
        model: EarlyExitNet,
        payload: Message,
        personal: Params | None,
        data: ClientData,
        ctx: ClientContext,
    ) -> None:
        """Put into ``model`` the weights this client would run at inference."""
        load_params(model, payload.tensors)
        if personal:
            load_params(model, personal)


# --------------------------------------------------------------------- helpers
GLOBAL_NS = "global/"


def global_params(state: ServerState) -> Params:
    """The ``global/`` namespace of a server state, with the prefix stripped."""
    n = len(GLOBAL_NS)
    return {k[n:]: v for k, v in state.tensors.items() if k.startswith(GLOBAL_NS)}


def with_global(state: ServerState, params: Params) -> ServerState:
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith(GLOBAL_NS)}
    tensors.update({GLOBAL_NS + k: v for k, v in params.items()})
    return ServerState(tensors=tensors, meta=dict(state.meta))


def load_params(model: torch.nn.Module, params: Params) -> None:
    """Copy a partial state_dict into ``model``; unknown keys are an error, not ignored."""
    own = model.state_dict()
    unknown = [k for k in params if k not in own]
    if unknown:
        raise KeyError(f"parameters not in the model: {unknown[:5]}")
    with torch.no_grad():
        for k, v in params.items():
            own[k].copy_(v)


def select(model: torch.nn.Module, keys: Sequence[str]) -> Params:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


# -------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """The registered names and those of the installed entry points (``cafe_ray.algorithms``)."""
    from cafe_ray.config import entry_point_names

    return sorted({*_REGISTRY, *entry_point_names("algorithm")})


def get_algorithm(name: str) -> type[Algorithm]:
    """The class registered as ``name``, or the plug-in it names (an import path
    ``package.module:Name`` or an installed entry point); a KeyError names the field."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    from cafe_ray.config import ConfigError, load_plugin, plugin_target

    if plugin_target("algorithm", name) is None:
        raise KeyError(f"algorithm.name: unknown algorithm {name!r}; available: {', '.join(available())}, "
                       "or your own class as package.module:Name")
    try:
        cls = load_plugin("algorithm", name)
    except ConfigError as err:
        raise KeyError(str(err)) from None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise KeyError(f"algorithm.name={name}: {cls!r} is not a subclass of cafe_ray.algorithms.Algorithm")
    return cls


def build_algorithm(cfg: ExperimentConfig) -> Algorithm:
    """The configured algorithm (the package import registers the built-in ones).

    ``algorithm.options`` go to a plug-in's constructor as keyword arguments, so the
    plug-in validates its own hyperparameters; built-in algorithms read their sections.
    """
    cls = get_algorithm(cfg.algorithm.name)
    options = dict(cfg.algorithm.options)
    if not options:
        return cls(cfg)
    if cfg.algorithm.name in _REGISTRY and cls.__module__.startswith("cafe_ray."):
        raise ValueError(f"algorithm.options: {cfg.algorithm.name} is built in and reads "
                         f"algorithm.<its section>; options are for plug-in algorithms")
    try:
        return cls(cfg, **options)
    except TypeError as err:
        raise ValueError(f"algorithm.options: {cfg.algorithm.name} rejects {sorted(options)} ({err})") from None
