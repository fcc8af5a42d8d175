"""What a serving replica does, without Ray: a run's clients, their models, their policies.

:class:`ModelService` reads a finished run (:class:`~cafe_ray.runs.RunArtifacts`, no pickle)
and answers every API call synchronously. The Serve deployment holds one and adds only
HTTP, ``serve.multiplexed`` model caching and ``serve.batch`` batching; tests and scripts can
use one directly (``ModelService(ServeConfig(run_dir=...)).predict(3, request)``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cafe_ray.inference.policies import ExitPolicy, available_policies, build_policy
from cafe_ray.models import EarlyExitNet
from cafe_ray.runs import RunArtifacts
from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.core import (
    SLO,
    Answer,
    InputSpec,
    InvalidPolicy,
    Job,
    MacCap,
    PolicyDefaults,
    PolicyKey,
    UnknownClient,
    policy_names,
    policy_request,
    prepare_model,
    request_inputs,
    run_jobs,
)
from cafe_ray.serve.schemas import (
    ClientDetail,
    ClientsResponse,
    ClientStats,
    ClientSummary,
    ExitInfo,
    Health,
    LatencyStats,
    PoliciesResponse,
    PredictRequest,
    PredictResponse,
    StatsResponse,
)
from cafe_ray.serve.slo import (
    ServiceModel,
    SloController,
    curve_point,
    ladder_curve,
    pooled_ladder,
    threshold_curve,
)
from cafe_ray.serve.stats import ServeStats

if TYPE_CHECKING:
    from cafe_ray.inference.cascade import CascadePolicy

POLICY_CACHE = 256  # built policies kept per replica (a calibrated budget policy costs a forward pass)
SLO_CONTROLLERS = 256  # (client, latency target) controllers kept per replica
LADDER_CLIENTS = 64  # clients whose val scores make the shared SLO ladder (evenly spaced over the run's)


def stage_seconds(model: EarlyExitNet, x: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds per sample of each stage and its exit head on ``x`` (best of ``repeats``): the SLO
    service model's prior, timed once by the replica on its own CPU."""
    best = np.full(model.num_exits, np.inf)
    with torch.no_grad():
        for _ in range(repeats):
            h = x
            for k in range(model.num_exits):
                t0 = time.perf_counter()
                h = model.stages[k](h)
                model.exits[k](h)
                best[k] = min(best[k], time.perf_counter() - t0)
    return (best / max(x.shape[0], 1)).tolist()


def learned_paths(path: str | Path | None) -> Path | dict[int, Path] | None:
    """One shared learned policy, or ``{client: policy}`` for a ``--per-client`` folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and not (p / "policy.safetensors").is_file():
        found = {int(d.name.removeprefix("client_")): d / "policy.safetensors" for d in p.glob("client_*")
                 if d.name.removeprefix("client_").isdigit() and (d / "policy.safetensors").is_file()}
        if not found:
            raise FileNotFoundError(f"learned policy: {p} holds neither policy.safetensors nor client_<ID>/"
                                    "policy.safetensors; pass what `cafe-ray policy train` wrote")
        return dict(sorted(found.items()))
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    weights = p / "policy.safetensors" if p.is_dir() else stem.with_name(stem.name + ".safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"learned policy: {weights} not found; a policy is NAME.safetensors + "
                                "NAME.json, as written by `cafe-ray policy train`")
    return weights


class ModelService:
    """A run's personal dynamic models behind the serving API (thread-safe)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.run = RunArtifacts(cfg.run_dir)
        self.cost = self.run.exit_cost
        ds = self.run.dataset
        self.spec = InputSpec(tuple(int(s) for s in ds.input_shape), ds.is_text,
                              self.run.cfg.data.vocab_size if ds.is_text else None)
        self.num_classes = int(ds.num_classes)
        self.classes = [str(c) for c in ds.classes] or [str(i) for i in range(self.num_classes)]
        self.client_ids = list(self.run.client_ids)
        self._clients = set(self.client_ids)
        self.defaults = PolicyDefaults(cfg.default_policy, cfg.default_threshold, cfg.default_max_entropy,
                                       cfg.latency_slo_ms)
        self.learned = learned_paths(cfg.learned)
        self._accuracy = self.run.last_eval()
        self._lock = threading.Lock()  # RunArtifacts and the policy cache are not thread-safe
        self._policies: OrderedDict[tuple[int, PolicyKey], ExitPolicy] = OrderedDict()
        self.stats = ServeStats()
        self.started = time.monotonic()
        self._scores: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # client -> val (max prob, correct) per exit
        self._implied: dict[tuple[int, PolicyKey], float] = {}  # val accuracy of a threshold / full key
        self._slo_lock = threading.Lock()  # controllers and the service model (event loop + model thread)
        self._controllers: OrderedDict[tuple[int, float], SloController] = OrderedDict()
        self.service_model: ServiceModel | None = None
        self._ladder: list[float | None] | None = None
        self._ladder_lock = threading.Lock()  # one replica computes the ladder once

    # ------------------------------------------------------------------ clients
    def check_client(self, client_id: int) -> None:
        if client_id not in self._clients:
            raise UnknownClient(f"unknown client {client_id}; this run has {len(self.client_ids)} clients "
                                f"({self._id_range()}); GET /v1/clients lists them")

    def _id_range(self) -> str:
        ids = self.client_ids
        return f"ids {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else f"ids {ids}"

    def profile(self, client_id: int) -> dict[str, Any]:
        return dict(self.run.profiles.get(client_id, {}))

    def load_model(self, client_id: int) -> EarlyExitNet:
        """Client ``client_id``'s personal model in eval mode (what ``serve.multiplexed`` caches)."""
        self.check_client(client_id)
        with self._lock:
            model = self.run.client_model(client_id)
        return prepare_model(model)

    def clients(self) -> ClientsResponse:
        return ClientsResponse(count=len(self.client_ids),
                               clients=[ClientSummary(client_id=c, profile=self.profile(c)) for c in self.client_ids])

    def client_detail(self, client_id: int) -> ClientDetail:
        self.check_client(client_id)
        c = self.cost
        acc = self._accuracy.get(client_id)
        exits = [ExitInfo(exit=k + 1, exit_index=k, stage_macs=int(c.stage_macs[k]), head_macs=int(c.head_macs[k]),
                          macs=int(c.cascade[k]), test_accuracy=None if acc is None else float(acc[k]))
                 for k in range(c.num_exits)]
        return ClientDetail(client_id=client_id, profile=self.profile(client_id), input_shape=list(self.spec.shape),
                            input_dtype=self.spec.dtype, num_classes=self.num_classes, classes=self.classes,
                            num_exits=c.num_exits, full_macs=int(c.cascade[-1]), exits=exits)

    def policies(self) -> PoliciesResponse:
        return PoliciesResponse(available=policy_names(), default=self.defaults.policy,
                                defaults={"threshold": self.defaults.threshold,
                                          "max_entropy": self.defaults.max_entropy,
                                          "mac_budget": "the client's device profile inference_mac_budget"},
                                learned=None if self.cfg.learned is None else self.display(self.cfg.learned))

    def health(self) -> Health:
        return Health(status="ok", run=self.run.run_dir.name, algorithm=self.run.cfg.algorithm.name,
                      dataset=self.run.cfg.data.name, round=self.run.round, clients=len(self.client_ids))

    def example_request(self) -> dict[str, Any]:
        """A valid predict request for this run's model: one sample of the real input shape (zeros,
        token id 0 for text), the default policy. The OpenAPI schema shows it."""
        sample: Any = 0 if self.spec.is_text else 0.0
        for n in reversed(self.spec.shape):
            sample = [sample] * n
        return {"inputs": [sample], "policy": "threshold", "threshold": self.defaults.threshold}

    # ------------------------------------------------------------------ no server paths out
    def display(self, path: str | Path) -> str:
        """A server path as clients may see it: relative to the run directory if inside it, else its
        name (answers never reveal the server's directory layout)."""
        p = Path(path)
        try:
            rel = p.resolve().relative_to(self.run.run_dir.resolve()).as_posix()
        except ValueError:
            return p.name
        return self.run.run_dir.name if rel == "." else rel

    def scrub(self, text: str) -> str:
        """``text`` with the server's absolute paths (run directory, learned policy) cut to display names."""
        roots = [(str(self.run.run_dir.resolve()), self.run.run_dir.name)]
        if self.cfg.learned is not None:
            roots.append((str(Path(self.cfg.learned).resolve().parent), ""))
        for root, name in sorted(roots, key=lambda r: -len(r[0])):
            text = text.replace(root + "/", (name + "/") if name else "").replace(root, name)
        return text

    def public_policy(self, policy: ExitPolicy) -> dict[str, Any]:
        """``policy.describe()`` with any path made a display name (the learned policy names its file)."""
        return self._public(policy.describe())

    def _public(self, v: Any) -> Any:
        """Every string that is an absolute path (e.g. a learned policy's provenance run_dir) made a
        display name, recursively."""
        if isinstance(v, dict):
            return {k: self._public(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [self._public(x) for x in v]
        if isinstance(v, Path) or (isinstance(v, str) and Path(v).is_absolute()):
            return self.display(v)
        return v

    # ------------------------------------------------------------------ requests
    def validate(self, client_id: int, req: PredictRequest, x: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, PolicyKey]:
        """The cheap checks, before any model is loaded: client, batch size, inputs, policy.
        ``x``: inputs decoded already (an ``application/x-npy`` body), else the request's."""
        self.check_client(client_id)
        if x is None:
            x = request_inputs(req, self.spec, self.cfg.max_batch)
        budget = self.profile(client_id).get("inference_mac_budget")
        return x, policy_request(req, self.defaults, budget)

    def cached_policy(self, client_id: int, key: PolicyKey) -> ExitPolicy | None:
        """The policy if it was built already (a dictionary lookup), else None."""
        with self._lock:
            hit = self._policies.get((client_id, key))
            if hit is not None:
                self._policies.move_to_end((client_id, key))
            return hit

    def policy(self, client_id: int, key: PolicyKey, model: EarlyExitNet) -> ExitPolicy:
        """The policy a validated key names, built once per (client, key) and cached (building a
        budget policy calibrates it on the client's val split: a forward pass)."""
        hit = self.cached_policy(client_id, key)
        if hit is not None:
            return hit
        pol = self._build_policy(client_id, key, model)
        if key[0] in ("threshold", "full"):
            t = dict(key[1]).get("threshold")
            self._implied[(client_id, key)] = curve_point(*self.val_scores(client_id, model), self.cost.cascade,
                                                          None if t is None else float(t)).accuracy
        with self._lock:
            self._policies[(client_id, key)] = pol
            while len(self._policies) > POLICY_CACHE:
                self._policies.popitem(last=False)
        return pol

    def _build_policy(self, client_id: int, key: PolicyKey, model: EarlyExitNet) -> ExitPolicy:
        name, items = key
        params = dict(items)
        try:
            if name == "budget":
                return self._budget_policy(client_id, params["budget"], model)
            if name == "learned":
                return self._learned_policy(client_id, params.get("budget"), model)
            return build_policy(name, **params)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise InvalidPolicy(self.scrub(f"policy {name!r}: {err}")) from None

    def _budget_policy(self, client_id: int, budget: float, model: EarlyExitNet) -> ExitPolicy:
        if "budget" not in available_policies():  # the registry has none: a per-sample cap
            return MacCap(self.cost.cascade, budget)
        with self._lock:
            x_val, _ = self.run.client_data(client_id, "val")
        if x_val.shape[0] == 0:
            raise ValueError(f"client {client_id} has no val samples to calibrate a budget threshold on")
        return build_policy("budget", model=model, data=x_val, cost=self.cost, budget=budget)

    def _learned_policy(self, client_id: int, budget: float | None, model: EarlyExitNet) -> ExitPolicy:
        if self.learned is None:
            raise ValueError("this server has no learned policy; start it with `cafe-ray serve RUN_DIR "
                             "--learned PATH` (a policy written by `cafe-ray policy train` or `policy fit`)")
        path = self.learned.get(client_id) if isinstance(self.learned, dict) else self.learned
        if path is None:
            raise ValueError(f"the per-client learned policies ({self.display(self.cfg.learned)}) have none for client "
                             f"{client_id}")
        from cafe_ray.inference.cascade import CascadePolicy, is_fitted_policy

        if is_fitted_policy(path):
            return self._fitted_policy(client_id, CascadePolicy(path), budget, model)
        fraction = None if budget is None else min(budget / self.cost.cascade[-1], 1.0)
        return build_policy("learned", path=path, budget=fraction)

    def _fitted_policy(self, client_id: int, pol: CascadePolicy, budget: float | None,
                       model: EarlyExitNet) -> ExitPolicy:
        """A `policy fit` policy bound to the client's label prior; with a budget, its operating point
        calibrated on the client's val split to that mean MACs per sample (as policy=budget does)."""
        from cafe_ray.inference.cascade import client_prior
        from cafe_ray.inference.trace import ExitTrace

        if tuple(pol.spec.exit_macs) != tuple(int(c) for c in self.cost.cascade) or \
                pol.spec.num_classes != self.num_classes:
            raise ValueError(f"the fitted policy was fitted for exits costing {list(pol.spec.exit_macs)} MACs and "
                             f"{pol.spec.num_classes} classes; this run's model has {list(self.cost.cascade)} and "
                             f"{self.num_classes}: fit one on this run (`cafe-ray policy fit RUN_DIR`)")
        with self._lock:
            own = pol.for_client(client_prior(self.run, client_id))
            if budget is None:
                return own
            x_val, y_val = self.run.client_data(client_id, "val")
        if x_val.shape[0] == 0:
            raise ValueError(f"client {client_id} has no val samples to calibrate the fitted policy's budget on")
        lam, _ = own.calibrate(ExitTrace.from_model(model, x_val, y_val, self.cost), budget)
        return own.with_lam(lam)

    # ------------------------------------------------------------------ latency SLO
    def val_scores(self, client_id: int, model: EarlyExitNet) -> tuple[np.ndarray, np.ndarray]:
        """(max softmax probability, answer right) per val sample and exit: the client's curve."""
        hit = self._scores.get(client_id)
        if hit is not None:
            return hit
        from cafe_ray.inference.trace import ExitTrace

        with self._lock:
            x_val, y_val = self.run.client_data(client_id, "val")
        if x_val.shape[0] == 0:
            raise InvalidPolicy(f"client {client_id} has no val samples to measure its accuracy-vs-MACs curve on "
                                "(latency_slo_ms needs one); train the run with data.val_fraction > 0")
        tr = ExitTrace.from_model(model, x_val, y_val, self.cost)
        z = tr.logits - tr.logits.max(axis=2, keepdims=True)
        p = np.exp(z)
        scores = ((p.max(axis=2) / p.sum(axis=2)), tr.logits.argmax(axis=2) == tr.labels[:, None])
        self._scores[client_id] = scores
        return scores

    def ladder(self) -> list[float | None]:
        """The thresholds every client's SLO curve follows (:func:`~cafe_ray.serve.slo.pooled_ladder`),
        from the val scores of up to :data:`LADDER_CLIENTS` clients, computed once per replica (the
        first SLO request pays a forward pass of each of their val splits)."""
        with self._ladder_lock:
            if self._ladder is None:
                ids = self.client_ids
                pick = sorted({ids[int(i)] for i in np.linspace(0, len(ids) - 1, min(len(ids), LADDER_CLIENTS))})
                scores = []
                for c in pick:
                    hit = self._scores.get(c)  # scored already (the client whose controller asks): no reload
                    try:
                        scores.append(hit if hit is not None else self.val_scores(c, self.load_model(c)))
                    except InvalidPolicy:  # no val samples: this client adds nothing to the pool
                        continue
                if not scores:
                    raise InvalidPolicy("no client of this run has val samples to measure the accuracy-vs-MACs "
                                        "ladder on (latency_slo_ms needs them); train with data.val_fraction > 0")
                self._ladder = pooled_ladder(scores, self.cost.cascade,
                                             max_accuracy_drop=self.cfg.max_accuracy_drop / 100)
            return self._ladder

    def cached_controller(self, client_id: int, slo_ms: float) -> SloController | None:
        with self._slo_lock:
            return self._controllers.get((client_id, slo_ms))

    def controller(self, client_id: int, slo_ms: float, model: EarlyExitNet) -> SloController:
        """The (client, target) controller, made on first use: the client's val curve above the
        floor, and (once per replica) the stages timed for the service model's prior."""
        hit = self.cached_controller(client_id, slo_ms)
        if hit is not None:
            return hit
        mp, ok = self.val_scores(client_id, model)
        drop = self.cfg.max_accuracy_drop / 100
        points = (ladder_curve(mp, ok, self.cost.cascade, self.ladder(), drop) if self.cfg.slo_curve == "pooled"
                  else threshold_curve(mp, ok, self.cost.cascade, max_accuracy_drop=drop))
        if self.service_model is None:
            with self._lock:
                x_val, _ = self.run.client_data(client_id, "val")
            sm = ServiceModel(stage_seconds(model, x_val[:64]))
        with self._slo_lock:
            if self.service_model is None:
                self.service_model = sm
            ctl = self._controllers.setdefault((client_id, slo_ms), SloController(points, slo_ms / 1000,
                                                                                   self.service_model))
            while len(self._controllers) > SLO_CONTROLLERS:
                self._controllers.popitem(last=False)
            return ctl

    def slo_policy(self, client_id: int, slo_ms: float, now: float) -> tuple[PolicyKey, ExitPolicy, dict[str, Any]]:
        """The policy the (existing) controller picks now: its key, the policy, how answers show it."""
        with self._slo_lock:
            ctl = self._controllers[(client_id, slo_ms)]
            ctl.update(now)
            idx, pt = ctl.index, ctl.point
        key: PolicyKey = ("full", ()) if pt.threshold is None else ("threshold", (("threshold", pt.threshold),))
        pol = self.cached_policy(client_id, key)
        if pol is None:
            pol = build_policy(key[0], **dict(key[1]))
            with self._lock:
                self._policies[(client_id, key)] = pol
        shown = {**pol.describe(), "latency_slo_ms": slo_ms, "operating_point": idx,
                 "val_accuracy": pt.accuracy}
        return key, pol, shown

    def observe_group(self, jobs: Sequence[Job], answers: Sequence[Answer | Exception], seconds: float) -> None:
        """One model call, for the service model: how many samples ran each stage, and how long."""
        if self.service_model is None:
            return
        ran = np.zeros(self.cost.num_exits)
        for a in answers:
            if isinstance(a, Answer):
                ran += np.bincount(a.pred.exits.numpy(), minlength=self.cost.num_exits)[::-1].cumsum()[::-1]
        if ran[0] > 0:
            with self._slo_lock:
                self.service_model.observe(ran, seconds)

    def finish(self, job: Job, answer: Answer, latency_s: float) -> None:
        """A request answered: into the stats, and to every SLO controller of its target.

        The clients of a replica share its CPU and its queue, so every (client, target)
        controller learns from all of the replica's requests with that target, not only its own
        client's: with many clients (or replicas) each client's own requests are too few to see
        the load in time."""
        n = int(answer.pred.macs.shape[0])
        if job.slo_ms is not None:
            acc = (job.described or {}).get("val_accuracy")
            now = time.perf_counter()
            with self._slo_lock:
                for (_, slo_ms), ctl in self._controllers.items():
                    if slo_ms == job.slo_ms:
                        ctl.observe(now, latency_s, answer.queue_s, n)
        else:
            acc = self._implied.get((job.client_id, job.key))
        self.stats.record(job.client_id, latency_s, answer.queue_s, n, float(answer.pred.macs.sum()), acc)

    def stats_snapshot(self, replica: str) -> StatsResponse:
        overall, clients = self.stats.snapshot()
        with self._slo_lock:
            ops: dict[int, list[dict[str, Any]]] = {}
            for (cid, slo_ms), c in self._controllers.items():
                ops.setdefault(cid, []).append({"latency_slo_ms": slo_ms, "index": c.index, "points": len(c.points),
                                                "moves": c.moves, **c.point.describe()})
            stage = None if self.service_model is None else (self.service_model.coef[1:] * 1e3).tolist()
        rows = [ClientStats(client_id=cid, operating_points=ops.get(cid, []), **s) for cid, s in clients.items()]
        rows += [ClientStats(client_id=cid, operating_points=o, **self.stats.empty()) for cid, o in sorted(ops.items())
                 if cid not in clients]
        return StatsResponse(replica=replica, uptime_s=time.monotonic() - self.started, overall=LatencyStats(**overall),
                             clients=sorted(rows, key=lambda r: r.client_id), stage_ms_per_sample=stage)

    def job(self, client_id: int, req: PredictRequest, model: EarlyExitNet,
            validated: tuple[Any, PolicyKey] | None = None) -> Job:
        x, key = validated or self.validate(client_id, req)
        if key[0] == SLO:
            slo_ms = float(dict(key[1])["latency_slo_ms"])
            self.controller(client_id, slo_ms, model)
            key, pol, shown = self.slo_policy(client_id, slo_ms, time.perf_counter())
            return Job(client_id, x, key, pol, req.return_probs, shown, time.perf_counter(), slo_ms)
        pol = self.policy(client_id, key, model)
        return Job(client_id, x, key, pol, req.return_probs, self.public_policy(pol), time.perf_counter())

    def run_jobs(self, jobs: Sequence[Job], models: Mapping[int, EarlyExitNet] | Callable[[int], EarlyExitNet],
                 ) -> list[Answer | Exception]:
        """Answer a batch; each answer carries how long its job waited before its model call."""
        queued: dict[int, float] = {}

        def on_group(group: Sequence[Job], answers: Sequence[Answer | Exception], seconds: float) -> None:
            start = time.perf_counter() - seconds
            for j in group:
                queued[id(j)] = max(start - j.t0, 0.0) if j.t0 else 0.0
            self.observe_group(group, answers, seconds)

        out = run_jobs(jobs, models, self.cost, on_group, self.cfg.batch_max_samples)
        return [dataclasses.replace(a, queue_s=queued.get(id(j), 0.0)) if isinstance(a, Answer) else a
                for j, a in zip(jobs, out, strict=True)]

    def predict(self, client_id: int, req: PredictRequest | dict[str, Any]) -> PredictResponse:
        """One request end to end, in this process (no Ray, no batching, no model cache)."""
        req = req if isinstance(req, PredictRequest) else PredictRequest.model_validate(req)
        validated = self.validate(client_id, req)
        model = self.load_model(client_id)
        t0 = time.perf_counter()
        job = self.job(client_id, req, model, validated)
        (out,) = self.run_jobs([job], {client_id: model})
        if isinstance(out, Exception):
            raise out
        self.finish(job, out, time.perf_counter() - t0)
        return out.response()
