"""The worker side of a simulation: runs virtual clients one at a time.

A :class:`ClientRunner` knows the dataset (shared, read-only arrays), the client
splits, the algorithm and one model instance that it resets to the experiment's
deterministic initial weights before every job. It knows nothing about Ray: the
sequential executor calls it in-process, a Ray client actor wraps it.

The runner trains on the ``device`` it is given (the Ray layer resolves it from the
actor's GPUs, cafe_ray.sim.device): model, batches, optimizer and distillation
state live there; payloads and personal state arrive as CPU tensors and are moved
on, uploads and personal state go back to the CPU before they leave the runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cafe_ray.algorithms import ClientContext, ClientData, ClientOutput, Message, build_algorithm
from cafe_ray.algorithms.base import Params
from cafe_ray.algorithms.training import exit_accuracies
from cafe_ray.config import ExperimentConfig
from cafe_ray.data.base import ArrayDataset, ClientSplit, ClientSplits
from cafe_ray.models import make_model
from cafe_ray.runs.store import ClientStateStore

if TYPE_CHECKING:
    from cafe_ray.sim.cohort import AutoVectorize, WideCache


class ClientJobError(RuntimeError):
    """A client job failed in algorithm code; names the client, round and stage."""


@dataclass(frozen=True)
class FitJob:
    client_id: int
    round: int
    num_rounds: int
    seed: int
    max_depth: int | None = None
    payload: Message | None = None  # filled by the executor (may travel by reference)
    width_factor: float = 1.0  # the device profile's width_factor (ScaleFL sub-model width)


@dataclass(frozen=True)
class FitResult:
    client_id: int
    round: int
    output: ClientOutput | None  # None when the client failed
    error: str | None = None
    wall_s: float = 0.0
    worker: dict = field(default_factory=dict)  # where it ran: pid, node, Ray resources


@dataclass(frozen=True)
class EvalJob:
    client_id: int
    round: int
    num_rounds: int
    seed: int
    payload: Message | None = None


@dataclass(frozen=True)
class EvalResult:
    client_id: int
    correct: tuple[int, ...]  # per exit, on the client's test split
    num_test: int
    val_correct: tuple[int, ...] = ()  # per exit, on its validation split (empty without one)
    num_val: int = 0

    @property
    def accuracies(self) -> list[float]:
        return [c / self.num_test if self.num_test else float("nan") for c in self.correct]

    @property
    def val_accuracies(self) -> list[float]:
        return [c / self.num_val for c in self.val_correct] if self.num_val else []


class _Threads:
    """Run torch single-threaded inside a job: deterministic and no oversubscription."""

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


def _cpu(params: Params) -> Params:
    return {k: v.detach().cpu() for k, v in params.items()}


class ClientRunner:
    def __init__(
        self,
        cfg: ExperimentConfig,
        dataset: ArrayDataset,
        splits: list[ClientSplit] | dict[int, ClientSplit],
        store_root: str | Path,
        worker_info: dict | None = None,
        device: str = "cpu",
    ) -> None:
        self.cfg = cfg
        # one path for every device: on the CPU the moves below return the same tensors
        self.device = torch.device(device)
        self.ds = dataset
        # ClientSplits is indexed by client id already (and may hold a million clients)
        self.splits = splits if isinstance(splits, dict | ClientSplits) else {s.client_id: s for s in splits}
        self.store = ClientStateStore(store_root)
        self.algorithm = build_algorithm(cfg)
        self.model = make_model(cfg, dataset).to(self.device)
        self._payload: tuple[Message, Message] | None = None  # (payload as sent, on the device): reused by a chunk
        self.init_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self._live: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (tensors, their state_dict views)
        self.worker_info = worker_info or {}
        self._wides: WideCache = {}  # cohort size -> (wide network or None, why not): built once per size
        self._auto: AutoVectorize | None = None  # engine.vectorize: auto's measurements and choice
        self._vectorizable: bool | None = None  # whether this algorithm and model can train as a cohort

    def _data(self, client_id: int) -> ClientData:
        data = ClientData.gather(self.ds, self.splits[client_id])
        return replace(data, **{f: getattr(data, f).to(self.device) for f in
                                ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")
                                if getattr(data, f) is not None})

    def _on_device(self, params: Params | None) -> Params | None:
        if params is None:
            return params
        return {k: v.to(self.device) for k, v in params.items()}

    def _in(self, payload: Message) -> Message:
        """The payload on the device: moved once for a run of jobs sharing it (most do)."""
        if self._payload is None or self._payload[0] is not payload:
            self._payload = (payload, replace(payload, tensors=self._on_device(payload.tensors)))
        return self._payload[1]

    def _personal(self, client_id: int) -> Params | None:
        return self._on_device(self.store.load(client_id))

    def _out(self, out: ClientOutput) -> ClientOutput:
        """Uploads and personal state back on the CPU: they cross the network or go to disk."""
        up = out.upload
        return replace(out, upload=replace(up, tensors=_cpu(up.tensors)),
                       personal=None if out.personal is None else _cpu(out.personal))

    def _reset(self) -> None:
        """Every client starts from the initial weights: copied tensor by tensor into views of
        the model's own tensors, kept while those tensors stay the same objects (``load_state_dict``
        walks every module with its checks, about a tenth of a tiny client's training time)."""
        params = list(self.model.parameters())
        tensors = [*params, *self.model.buffers()]
        live = self._live
        if live is None or len(live[0]) != len(tensors) or any(a is not b for a, b in zip(live[0], tensors, strict=True)):
            sd = self.model.state_dict()
            if sd.keys() != self.init_state.keys():  # not the model it was built as: say which keys differ
                self.model.load_state_dict(self.init_state)
            live = self._live = (tensors, [sd[k] for k in self.init_state])
        with torch.no_grad():
            for dst, src in zip(live[1], self.init_state.values(), strict=True):
                dst.copy_(src)
        for p in params:
            p.requires_grad_(True)

    def fit(self, job: FitJob) -> FitResult:
        """Train one client; its new personal state is *staged*, committed by the server."""
        t0 = time.perf_counter()
        if job.payload is None:
            raise ClientJobError(f"client {job.client_id} round {job.round}: fit job has no payload")
        stage = "load"
        try:
            with _Threads():
                self._reset()
                data = self._data(job.client_id)
                personal = self._personal(job.client_id)
                ctx = ClientContext(job.client_id, job.round, job.num_rounds, job.seed, job.max_depth,
                                    job.width_factor)
                stage = "client_update"
                out = self.algorithm.client_update(self.model, self._in(job.payload), personal, data, ctx)
                stage = "store"
                out = self._out(out)
                if out.personal is not None:
                    self.store.stage(job.client_id, job.round, out.personal)
        except Exception as err:
            raise ClientJobError(
                f"client {job.client_id} round {job.round} failed in {stage} "
                f"({self.cfg.algorithm.name}): {type(err).__name__}: {err}"
            ) from err
        return FitResult(
            client_id=job.client_id, round=job.round, output=replace(out, personal=None),
            wall_s=time.perf_counter() - t0, worker=self.worker_info,
        )

    @property
    def vectorizes(self) -> bool:
        """engine.vectorize is on or auto, the algorithm supports it and the model allows it
        (an algorithm with its own batched loss needs the grouped-kernel cohort)."""
        if self.cfg.engine.vectorize == "off" or not self.algorithm.supports_vectorize():
            return False
        if self._vectorizable is None:
            from cafe_ray.sim.cohort import can_vectorize

            self._vectorizable = can_vectorize(self.model, wide=self._own_loss) is None
        return self._vectorizable

    @property
    def _own_loss(self) -> bool:
        """The algorithm computes its own batched loss (not the default sum of exit CEs)."""
        from cafe_ray.algorithms.base import Algorithm

        return type(self.algorithm).cohort_loss is not Algorithm.cohort_loss

    def fit_many(self, jobs: list[FitJob]) -> list[FitResult]:
        """Train several clients: one batched cohort when :attr:`vectorizes` (under ``auto``:
        when that measured faster on this actor), else one by one."""
        if len(jobs) < 2 or not self.vectorizes:
            return [self.fit(j) for j in jobs]
        if self.cfg.engine.vectorize == "on":
            return self._fit_cohort(jobs)
        from cafe_ray.sim.cohort import AutoVectorize

        if self._auto is None:
            self._auto = AutoVectorize()
        batched = self._auto.next_vectorized()
        t0 = time.perf_counter()
        out = self._fit_cohort(jobs) if batched else [self.fit(j) for j in jobs]
        samples = sum(r.output.samples_processed for r in out if r.output is not None)
        self._auto.record(batched, time.perf_counter() - t0, samples)
        note = self._auto.describe()
        return [replace(r, worker={**r.worker, "vectorize": note}) for r in out]

    def _fit_cohort(self, jobs: list[FitJob]) -> list[FitResult]:
        from cafe_ray.sim.cohort import cohort_sgd

        t0 = time.perf_counter()
        stage = "load"
        ids = [j.client_id for j in jobs]
        try:
            with _Threads():
                starts, datas, ctxs, personals, extras = [], [], [], [], []
                for j in jobs:
                    if j.payload is None:
                        raise ClientJobError(f"client {j.client_id} round {j.round}: fit job has no payload")
                    self._reset()
                    data = self._data(j.client_id)
                    personal = self._personal(j.client_id)
                    ctx = ClientContext(j.client_id, j.round, j.num_rounds, j.seed, j.max_depth, j.width_factor)
                    extras.append(self.algorithm.client_start(self.model, self._in(j.payload), personal, data, ctx))
                    starts.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
                    datas.append(data)
                    ctxs.append(ctx)
                    personals.append(personal)
                stage = "cohort local SGD"
                trained = cohort_sgd(self.model, starts, datas, ctxs, self.cfg.train, self._wides,
                                     self.algorithm.cohort_loss if self._own_loss else None, extras)
                stage = "client_finish"
                outs = []
                for j, data, ctx, personal, (params, loss, seen, extra) in zip(
                        jobs, datas, ctxs, personals, trained, strict=True):
                    with torch.no_grad():  # every parameter is overwritten and there are no buffers
                        for n, p in self.model.named_parameters():
                            p.copy_(params[n])
                    out = self._out(self.algorithm.client_finish(self.model, self._in(j.payload), personal, data,
                                                                 ctx, loss, seen, extra or None))
                    if out.personal is not None:
                        self.store.stage(j.client_id, j.round, out.personal)
                    outs.append(out)
        except ClientJobError:
            raise
        except Exception as err:
            raise ClientJobError(
                f"clients {ids} round {jobs[0].round} failed in {stage} (vectorized cohort, "
                f"{self.cfg.algorithm.name}): {type(err).__name__}: {err}; engine.vectorize=off runs them one by one"
            ) from err
        wall = (time.perf_counter() - t0) / len(jobs)
        return [FitResult(client_id=j.client_id, round=j.round, output=replace(o, personal=None), wall_s=wall,
                          worker={**self.worker_info, "cohort": len(jobs)})
                for j, o in zip(jobs, outs, strict=True)]

    def evaluate(self, job: EvalJob) -> EvalResult:
        """Per-exit accuracy of the model this client would run, on its own test split."""
        if job.payload is None:
            raise ClientJobError(f"client {job.client_id} round {job.round}: eval job has no payload")
        try:
            with _Threads():
                self._reset()
                data = self._data(job.client_id)
                personal = self._personal(job.client_id)
                ctx = ClientContext(job.client_id, job.round, job.num_rounds, job.seed)
                self.algorithm.load_for_eval(self.model, self._in(job.payload), personal, data, ctx)
                accs = exit_accuracies(self.model, data.x_test, data.y_test)
                val_accs = (exit_accuracies(self.model, data.x_val, data.y_val)
                            if data.x_val is not None else [])
        except Exception as err:
            raise ClientJobError(
                f"client {job.client_id} round {job.round} failed in evaluate: {type(err).__name__}: {err}"
            ) from err
        n = int(data.y_test.shape[0])
        nv = int(data.y_val.shape[0]) if data.y_val is not None else 0
        return EvalResult(job.client_id, tuple(int(round(a * n)) for a in accs), n,
                          tuple(int(round(a * nv)) for a in val_accs), nv)
