"""The pure core of serving: request -> input tensor, request -> exit policy, jobs -> answers.

Nothing here imports Ray: the Serve deployment (:mod:`cafe_ray.serve.app`) is a thin shell
that validates with these functions, loads client models through ``serve.multiplexed``, and
hands each ``serve.batch`` of :class:`Job` to :func:`run_jobs`, which groups them by client
model and policy and runs every sample only as deep as its policy decides
(:func:`~cafe_ray.inference.predict_batch`).

Errors are :class:`RequestError` subclasses carrying the HTTP status they map to; their
messages say what was wrong, the value, and what is accepted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cafe_ray.inference.dynamic import Prediction, predict_batch
from cafe_ray.inference.policies import ExitPolicy, available_policies
from cafe_ray.models import EarlyExitNet, ExitCost
from cafe_ray.serve.schemas import PredictRequest, PredictResponse

PolicyKey = tuple[str, tuple[tuple[str, Any], ...]]  # (name, sorted params): equal keys batch together

# Which request fields each policy takes; a field given to another policy is an error.
POLICY_FIELDS: dict[str, frozenset[str]] = {
    "threshold": frozenset({"threshold"}),
    "entropy": frozenset({"max_entropy"}),
    "budget": frozenset({"mac_budget"}),
    "learned": frozenset({"mac_budget"}),
}
_REQUEST_POLICY_FIELDS = ("threshold", "max_entropy", "mac_budget")
SLO = "slo"  # the key of a request under latency-SLO control: the controller picks its threshold


# ---------------------------------------------------------------------------- errors
class RequestError(ValueError):
    """A request the server cannot answer; ``status_code`` is the HTTP status it maps to, ``loc``
    where the problem is (as in FastAPI's validation errors) and ``kind`` its machine-readable type."""

    status_code = 422
    loc: tuple[str | int, ...] = ("body",)
    kind = "invalid_request"

    def __init__(self, msg: str, loc: Sequence[str | int] | None = None) -> None:
        super().__init__(msg)
        if loc is not None:
            self.loc = tuple(loc)

    def error(self) -> dict[str, Any]:
        """This error as one item of the API's error shape ``{"detail": [{loc, msg, type}]}``."""
        return {"loc": list(self.loc), "msg": str(self), "type": self.kind}


class InvalidInput(RequestError):
    status_code = 422
    loc = ("body", "inputs")
    kind = "invalid_input"


class InvalidPolicy(RequestError):
    status_code = 422
    loc = ("body", "policy")
    kind = "invalid_policy"


class UnknownClient(RequestError):
    status_code = 404
    loc = ("path", "client_id")
    kind = "unknown_client"


class BatchTooLarge(RequestError):
    status_code = 413
    loc = ("body", "inputs")
    kind = "batch_too_large"


class ClientMismatch(RequestError):
    status_code = 400
    loc = ("header", "serve_multiplexed_model_id")
    kind = "client_mismatch"


class BodyTooLarge(RequestError):
    status_code = 413
    loc = ("body",)
    kind = "body_too_large"


class TooManyValues(BodyTooLarge):
    kind = "too_many_values"


class BodyTooDeep(RequestError):
    status_code = 422
    loc = ("body",)
    kind = "json_too_deep"


class UnsupportedMediaType(RequestError):
    status_code = 415
    loc = ("header", "content-type")
    kind = "unsupported_media_type"


def client_from_model_id(client_id: int | None, model_id: str | None) -> int:
    """The client a request is for: the URL's / argument's id, or Serve's multiplexed model id
    (``serve_multiplexed_model_id`` header, ``handle.options(multiplexed_model_id=...)``).
    Both may be given only if they agree."""
    mid: int | None = None
    if model_id:
        try:
            mid = int(model_id)
        except ValueError:
            raise InvalidInput(f"multiplexed model id {model_id!r} is not a client id (an integer)") from None
    if client_id is not None and mid is not None and client_id != mid:
        raise ClientMismatch(f"the request names client {client_id} but its multiplexed model id is "
                             f"{model_id!r}; send one or make them agree")
    cid = client_id if client_id is not None else mid
    if cid is None:
        raise InvalidInput("no client id: call handle.options(multiplexed_model_id=str(client_id)) or pass "
                           "client_id=")
    return cid


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputSpec:
    """What one sample must look like for a run's model."""

    shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28) or (64,) token ids
    is_text: bool  # int64 token ids in [0, vocab_size) instead of float32 pixels
    vocab_size: int | None = None

    @property
    def dtype(self) -> str:
        return "int64" if self.is_text else "float32"

    def describe(self) -> str:
        kind = f"integer token ids in [0, {self.vocab_size})" if self.is_text else "finite floats"
        return f"(batch, {', '.join(map(str, self.shape))}) of {kind}"


def parse_inputs(inputs: Sequence[Any], spec: InputSpec, max_batch: int) -> torch.Tensor:
    """Nested lists -> (B, *spec.shape) tensor, or a :class:`RequestError` saying what is wrong.

    Strings, nulls and all-boolean inputs are rejected; JSON booleans mixed with numbers are
    read as 0/1 (as numpy does), not scanned for one by one.
    """
    _check_count(len(inputs), spec, max_batch)
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"inputs must be nested lists of shape {spec.describe()}; they are ragged "
                           f"({err})") from None
    return parse_array(arr, spec, max_batch)


def _check_count(n: int, spec: InputSpec, max_batch: int) -> None:
    if n == 0:
        raise InvalidInput(f"inputs is empty; send 1 to {max_batch} samples of shape {spec.describe()}")
    if n > max_batch:
        raise BatchTooLarge(f"inputs has {n} samples; this server takes at most {max_batch} per request "
                            "(split the batch, or start the server with a larger --max-batch)")


def parse_array(arr: np.ndarray, spec: InputSpec, max_batch: int) -> torch.Tensor:
    """A decoded array (nested lists, ``.npy`` body or base64) -> (B, *spec.shape) tensor, checked."""
    if arr.ndim == 0:
        raise InvalidInput(f"inputs must be an array of shape {spec.describe()}, got a scalar")
    _check_count(arr.shape[0], spec, max_batch)
    if arr.dtype.kind not in "iuf":
        what = {"b": "booleans", "U": "strings", "S": "bytes", "O": "nulls, objects or out-of-range numbers",
                "c": "complex numbers"}
        raise InvalidInput(f"inputs must be numbers, got {what.get(arr.dtype.kind, arr.dtype.name)}; "
                           f"expected {spec.describe()}")
    if arr.shape[1:] != spec.shape:
        raise InvalidInput(f"inputs has shape {tuple(arr.shape)}; expected {spec.describe()} (a list of "
                           f"samples, each of shape {spec.shape})")
    if spec.is_text:
        if arr.dtype.kind == "f":
            raise InvalidInput(f"inputs must be integer token ids for this text model, got floats; "
                               f"expected {spec.describe()}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (spec.vocab_size is not None and hi >= spec.vocab_size):
            raise InvalidInput(f"token ids must lie in [0, {spec.vocab_size}), got values in [{lo}, {hi}]")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)  # beyond float32 becomes inf, rejected below
    if arr.dtype.kind == "f" and not np.isfinite(out.sum(dtype=np.float64)):  # one pass when all is well
        bad = ~np.isfinite(out)
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInput(f"inputs must be finite numbers (float32); {int(bad.sum())} value(s) are NaN, "
                           f"infinite or beyond float32, the first at index {list(where)}")
    if not out.flags.writeable:  # np.frombuffer over request bytes: torch wants a writable array
        out = out.copy()
    return torch.from_numpy(out)


def decode_b64(data: str, spec: InputSpec, max_batch: int) -> torch.Tensor:
    """``inputs_b64``: base64 of raw little-endian ``spec.dtype`` bytes, C order, batch first."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"inputs_b64 is not valid base64 ({err})", loc=("body", "inputs_b64")) from None
    dtype = np.dtype("<i8" if spec.is_text else "<f4")
    per = int(np.prod(spec.shape)) * dtype.itemsize
    if len(raw) == 0 or len(raw) % per:
        raise InvalidInput(f"inputs_b64 holds {len(raw)} bytes, not a whole number of samples: one sample is "
                           f"{per} bytes ({spec.dtype}, shape {spec.shape})", loc=("body", "inputs_b64"))
    arr = np.frombuffer(raw, dtype=dtype).reshape(-1, *spec.shape)
    try:
        return parse_array(arr, spec, max_batch)
    except InvalidInput as err:
        raise InvalidInput(str(err), loc=("body", "inputs_b64")) from None


def decode_npy(body: bytes, spec: InputSpec, max_batch: int) -> torch.Tensor:
    """An ``application/x-npy`` body: one array as written by ``numpy.save`` (no pickled objects)."""
    import io

    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InvalidInput(f"the body is not a .npy array ({err}); send numpy.save(buf, x) of shape "
                           f"{spec.describe()}", loc=("body",)) from None
    if not isinstance(arr, np.ndarray):
        raise InvalidInput("the body is not a single .npy array", loc=("body",))
    try:
        return parse_array(arr, spec, max_batch)
    except RequestError as err:
        err.loc = ("body",)
        raise


def request_inputs(req: PredictRequest, spec: InputSpec, max_batch: int) -> torch.Tensor:
    """The samples of a JSON request: ``inputs`` (nested lists) or ``inputs_b64``, exactly one."""
    if (req.inputs is None) == (req.inputs_b64 is None):
        raise InvalidInput("give exactly one of inputs (nested lists) and inputs_b64 (base64 of raw "
                           f"{spec.dtype} bytes); expected {spec.describe()}", loc=("body",))
    if req.inputs_b64 is not None:
        return decode_b64(req.inputs_b64, spec, max_batch)
    return parse_inputs(req.inputs, spec, max_batch)


# ---------------------------------------------------------------------------- policies
def policy_names() -> list[str]:
    """Policies a request may name, read from the registry at call time (+ ``budget``, which
    this package provides as :class:`MacCap` when the registry has none)."""
    return sorted(set(available_policies()) | {"budget"})


@dataclass(frozen=True)
class PolicyDefaults:
    policy: str = "threshold"
    threshold: float = 0.6
    max_entropy: float = 0.5
    latency_slo_ms: float | None = None  # SLO control of requests that name no policy and no parameter


def policy_request(req: PredictRequest, defaults: PolicyDefaults,
                   profile_budget: float | None = None) -> PolicyKey:
    """Validate a request's policy name and parameters; returns the (name, params) key.

    ``params`` are what the policy is built with: ``threshold`` / ``max_entropy`` (defaults
    filled in), ``budget`` (MACs per sample; for ``budget`` the request's ``mac_budget`` or else
    ``profile_budget``, the client's device profile budget) or nothing. A request with
    ``latency_slo_ms`` (or, on a server with a default SLO, one that names no policy and no
    parameter) gets the key ``("slo", (("latency_slo_ms", ms),))``: its threshold is the SLO
    controller's to pick.
    """
    given = [f for f in _REQUEST_POLICY_FIELDS if getattr(req, f) is not None]
    if req.latency_slo_ms is not None:
        if req.policy not in (None, "threshold") or given:
            raise InvalidPolicy("latency_slo_ms: the server picks the exit threshold that meets it, so give it with "
                                "policy threshold (or no policy) and without "
                                f"{', '.join(given) if given else 'another policy'}", loc=("body", "latency_slo_ms"))
        return SLO, (("latency_slo_ms", float(req.latency_slo_ms)),)
    if req.policy is None and not given and defaults.latency_slo_ms is not None:
        return SLO, (("latency_slo_ms", float(defaults.latency_slo_ms)),)
    name = req.policy or defaults.policy
    names = policy_names()
    if name not in names:
        raise InvalidPolicy(f"policy: unknown policy {name!r}; available: {', '.join(names)}")
    takes = POLICY_FIELDS.get(name, frozenset())
    extra = [f for f in given if f not in takes]
    if extra:
        hint = f"it takes {', '.join(sorted(takes))}" if takes else "it takes no parameters"
        raise InvalidPolicy(f"{', '.join(extra)} does not apply to policy {name!r} ({hint})")
    params: dict[str, Any] = {}
    if name == "threshold":
        params["threshold"] = defaults.threshold if req.threshold is None else float(req.threshold)
    elif name == "entropy":
        params["max_entropy"] = defaults.max_entropy if req.max_entropy is None else float(req.max_entropy)
    elif name == "budget":
        budget = req.mac_budget if req.mac_budget is not None else profile_budget
        if budget is None:
            raise InvalidPolicy("policy 'budget' needs mac_budget (MACs per sample), and this client's "
                                "device profile has no inference_mac_budget to default to")
        params["budget"] = float(budget)
    elif name == "learned" and req.mac_budget is not None:
        params["budget"] = float(req.mac_budget)
    return name, tuple(sorted(params.items()))


def cap_exit(cascade: Sequence[int], budget: float) -> int:
    """0-based deepest exit whose cascade MACs fit ``budget``; raises if not even exit 1 does."""
    fits = [k for k, c in enumerate(cascade) if c <= budget]
    if not fits:
        raise ValueError(f"mac_budget {budget:,.0f} MACs/sample is below exit 1's {int(cascade[0]):,} MACs: "
                         f"no exit fits; use a budget >= {int(cascade[0]):,} (full depth is "
                         f"{int(cascade[-1]):,})")
    return fits[-1]


class MacCap(ExitPolicy):
    """Per-sample MAC cap: every sample exits at the deepest exit whose cascade MACs fit ``budget``.

    The serving fallback for ``policy=budget`` when the policy registry has no ``budget`` entry:
    the simplest rule that never spends more than the budget on any sample.
    """

    name = "budget"

    def __init__(self, cascade: Sequence[int], budget: float) -> None:
        self.budget = float(budget)
        self.exit_index = cap_exit(cascade, budget)

    def should_exit(self, probs, k, num_exits, macs_spent):
        return torch.full((probs.shape[0],), k >= self.exit_index, dtype=torch.bool)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "budget": self.budget, "rule": "per-sample cap",
                "exit": self.exit_index + 1}


# ---------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One request, validated: what ``serve.batch`` queues."""

    client_id: int
    x: torch.Tensor  # (B, *input_shape)
    key: PolicyKey  # equal keys on one client run as one predict_batch call
    policy: ExitPolicy
    return_probs: bool = False
    described: dict[str, Any] | None = None  # the policy as answers show it (default: policy.describe())
    t0: float = 0.0  # time.perf_counter() when the replica took the request (queueing delay, latency)
    slo_ms: float | None = None  # the latency target whose controller chose the policy, if any


def group_jobs(jobs: Sequence[Job], max_samples: int | None = None) -> list[list[int]]:
    """Indices of ``jobs`` grouped by (client, policy key), in order of first appearance; with
    ``max_samples``, a group is closed once adding a job would pass that many samples (a job
    larger than it runs alone). On CPU a forward pass over very large merged batches costs more
    per sample (activations leave the cache; docs/serving.md)."""
    groups: dict[tuple[int, PolicyKey], list[list[int]]] = {}
    sizes: dict[tuple[int, PolicyKey], int] = {}
    order: list[list[int]] = []
    for i, j in enumerate(jobs):
        key, n = (j.client_id, j.key), int(j.x.shape[0])
        if key not in groups or (max_samples is not None and sizes[key] + n > max_samples and sizes[key] > 0):
            groups.setdefault(key, []).append([])
            order.append(groups[key][-1])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += n
    return order


@dataclass(frozen=True)
class Answer:
    """One request's answer, not yet encoded: the HTTP path writes JSON bytes straight from the
    tensors (:meth:`json_bytes`, no per-sample model objects), a handle call gets :meth:`response`."""

    client_id: int
    policy: dict[str, Any]
    pred: Prediction
    num_exits: int
    full_macs: int
    return_probs: bool
    queue_s: float = 0.0  # how long its job waited in the replica before its model call

    def to_dict(self) -> dict[str, Any]:
        p = self.pred
        labels, exits = p.labels.tolist(), p.exits.tolist()
        conf, macs = p.confidence.tolist(), p.macs.tolist()
        probs = p.probs.tolist() if self.return_probs else None
        samples = [{"label": lab, "exit": e + 1, "exit_index": e, "confidence": c, "macs": m,
                    "probs": None if probs is None else probs[i]}
                   for i, (lab, e, c, m) in enumerate(zip(labels, exits, conf, macs, strict=True))]
        return {"client_id": self.client_id, "policy": self.policy, "num_exits": self.num_exits,
                "full_macs": self.full_macs, "mean_macs": float(np.mean(macs)), "predictions": samples}

    def json_bytes(self) -> bytes:
        """The :class:`PredictResponse` JSON, encoded directly (what HTTP sends)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    def response(self) -> PredictResponse:
        return PredictResponse.model_validate(self.to_dict())


def answer(client_id: int, policy: ExitPolicy, pred: Prediction, cost: ExitCost,
           return_probs: bool) -> PredictResponse:
    """A :class:`Prediction` (one request's slice) as the API's response."""
    return Answer(client_id, policy.describe(), pred, cost.num_exits, int(cost.cascade[-1]), return_probs).response()


def _slice(pred: Prediction, a: int, b: int) -> Prediction:
    return Prediction(pred.labels[a:b], pred.exits[a:b], pred.confidence[a:b], pred.macs[a:b], pred.probs[a:b])


def prepare_model(model: EarlyExitNet) -> EarlyExitNet:
    """A loaded model made ready to serve: no gradients, eval mode, the default (contiguous)
    memory layout. Channels-last used to pay for itself only through the first stage's
    max-pool; with :class:`~cafe_ray.models.zoo.MaxPool2x2` it makes the Fashion-MNIST
    forward slower (GroupNorm is several times slower in it on CPU): w32 full depth 9.2 vs
    7.0 ms, threshold 0.85 5.1 vs 3.4 ms (docs/serving.md)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def run_group(model: EarlyExitNet, jobs: Sequence[Job], cost: ExitCost) -> list[Answer | Exception]:
    """Jobs of one client and one policy key: one early-exit forward over all their samples.

    Finite inputs can still overflow the model (1e30 pixels: GroupNorm's variance is inf, the
    logits NaN); such a job gets :class:`InvalidInput` naming its samples, the others their answers.
    """
    x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
    pred = predict_batch(model, x, jobs[0].policy, cost)
    finite = torch.isfinite(pred.probs).all(dim=1)
    out: list[Answer | Exception] = []
    a = 0
    for j in jobs:
        b = a + j.x.shape[0]
        bad = (~finite[a:b]).nonzero(as_tuple=True)[0]
        if bad.numel():
            out.append(InvalidInput(
                f"inputs: {bad.numel()} sample(s) (the first at index {int(bad[0])}) drive the model's outputs to "
                "NaN or infinity: their values are far outside what it was trained on; send inputs on the "
                "training data's scale"))
        else:
            out.append(Answer(j.client_id, j.described if j.described is not None else j.policy.describe(),
                              _slice(pred, a, b), cost.num_exits, int(cost.cascade[-1]), j.return_probs))
        a = b
    return out


GroupObserver = Callable[[Sequence[Job], Sequence["Answer | Exception"], float], None]


def run_jobs(jobs: Sequence[Job], model: Callable[[int], EarlyExitNet] | Mapping[int, EarlyExitNet],
             cost: ExitCost, on_group: GroupObserver | None = None, max_samples: int | None = None,
             ) -> list[Answer | Exception]:
    """Answer a batch of jobs, aligned with ``jobs``; a group that fails yields its exception for
    each of its jobs and leaves the other groups' answers intact. ``on_group(jobs, answers,
    seconds)`` is told each group's model call and how long it took (the SLO service model);
    ``max_samples`` caps the samples of one model call (:func:`group_jobs`)."""
    get = model.__getitem__ if isinstance(model, Mapping) else model
    out: list[Answer | Exception] = [RuntimeError("unanswered")] * len(jobs)
    for idx in group_jobs(jobs, max_samples):
        group = [jobs[i] for i in idx]
        t0 = time.perf_counter()
        try:
            answers: list[Answer | Exception] = list(run_group(get(group[0].client_id), group, cost))
        except Exception as err:  # noqa: BLE001 - reported to each request of the group
            answers = [err] * len(group)
        else:
            if on_group is not None:
                on_group(group, answers, time.perf_counter() - t0)
        for i, a in zip(idx, answers, strict=True):
            out[i] = a
    return out
