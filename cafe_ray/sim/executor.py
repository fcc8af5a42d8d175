"""Two executors behind one interface: in-process sequential, and Ray actor pools.

The round loop (cafe_ray.sim.simulation) says *what* runs; an executor decides
*how*. Same seeds, same results on both (a test checks it).

Ray: one bounded pool of client actors per resource class, each actor running
many virtual clients in turn with that class's Ray resources. One actor call
trains a chunk of clients and returns their uploads as flat numpy buffers. By
default a round's jobs are split into one chunk per actor, balanced by the work
each client brings (its training or test samples: longest first, onto the least
loaded chunk), and into more, fed to whichever actor is free, once a round has
shown that the work is long; ``engine.chunk_clients`` fixes the size instead,
and ``engine.vectorize`` trains fixed cohorts. Actors start before the data is
loaded; the dataset goes to the object store once and travels with each call by
reference; an identical payload is put once per round. An actor that dies
mid-round is restarted by Ray; the jobs it held count as failed.

Inside a placement group that captures child tasks (a Ray Tune trial), the pools
are fitted to that group's bundles, not to the whole cluster, so concurrent
trials never oversubscribe the machine. Elsewhere the pools first ask the
cluster's autoscaler for their nodes (cafe_ray.sim.autoscale), and grow at a later
round when nodes join after they were built.
"""

from __future__ import annotations

import heapq
import os
import socket
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch

from cafe_ray.algorithms import flat
from cafe_ray.algorithms.base import Message, Params
from cafe_ray.config import ExperimentConfig, TrainConfig
from cafe_ray.data.base import ArrayDataset, ClientSplit
from cafe_ray.sim import autoscale
from cafe_ray.sim.profiles import ResourceClass, check_fits
from cafe_ray.sim.runner import ClientRunner, EvalJob, EvalResult, FitJob, FitResult


class Executor(ABC):
    @abstractmethod
    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        """Results in job order; a client whose worker died has ``output=None``."""

    @abstractmethod
    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        """Results in job order."""

    @abstractmethod
    def attach(self, dataset: ArrayDataset, splits: Sequence[ClientSplit]) -> tuple[ArrayDataset, Sequence[ClientSplit]]:
        """Hand the workers the data (they may already be starting); returns the copy to keep.

        The caller keeps the returned objects and drops its own, so the coordinator
        holds one copy of the dataset (Ray: zero-copy views of the object store's).
        """

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass


def attached(runner: ClientRunner | None) -> ClientRunner:
    """The runner of an executor or actor whose data is attached (a clear error otherwise)."""
    if runner is None:
        raise RuntimeError("no client data attached yet: attach() comes before any job")
    return runner


class SequentialExecutor(Executor):
    """Runs every client in this process, one after the other: for debugging."""

    def __init__(self, cfg: ExperimentConfig, dataset: ArrayDataset | None, splits: Sequence[ClientSplit] | None,
                 store_root: str, client_class: Mapping[int, str] | None = None) -> None:
        self.cfg, self.store_root = cfg, store_root
        self.client_class = client_class  # cohorts (engine.vectorize) never mix resource classes
        self.runner: ClientRunner | None = None
        if dataset is not None and splits is not None:
            self.attach(dataset, splits)

    def attach(self, dataset: ArrayDataset, splits: Sequence[ClientSplit]) -> tuple[ArrayDataset, Sequence[ClientSplit]]:
        self.runner = ClientRunner(self.cfg, dataset, splits, self.store_root,
                                   worker_info={"pid": os.getpid(), "executor": "sequential", "device": "cpu"})
        return dataset, splits

    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        if self.cfg.engine.vectorize == "off":
            return [attached(self.runner).fit(j) for j in jobs]
        from cafe_ray.sim.cohort import cohort_size, split_cohorts

        splits, train = attached(self.runner).splits, self.cfg.train
        results: list = [None] * len(jobs)
        for chunk in split_cohorts(jobs, cohort_size(self.cfg.engine.chunk_clients), self.client_class,
                                   lambda j: float(train_work(len(splits[j.client_id].train_idx), train))):
            for i, r in zip(chunk, attached(self.runner).fit_many([jobs[i] for i in chunk]), strict=True):
                results[i] = r
        return results

    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        return [attached(self.runner).evaluate(j) for j in jobs]


# ---------------------------------------------------------------------------- Ray
def fit_capacity() -> tuple[dict[str, float], str]:
    """What this process's client actors may use: (resources, "placement group" | "cluster").

    In a placement group whose child tasks are captured (Tune trials, Train workers),
    actors created here land in its bundles: the capacity is the bundles' total minus
    what this process itself holds. Elsewhere it is the cluster's available resources.
    """
    import ray
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    ctx = ray.get_runtime_context()
    if pg is None or not ctx.should_capture_child_tasks_in_placement_group:
        return dict(ray.available_resources()), "cluster"
    total: dict[str, float] = {}
    for bundle in pg.bundle_specs:
        for r, v in bundle.items():
            total[r] = total.get(r, 0.0) + float(v)
    for r, v in ctx.get_assigned_resources().items():
        if r in total:
            total[r] = max(0.0, total[r] - float(v))
    return total, "placement group"


def pack_results(results: Sequence[FitResult]) -> tuple[list[FitResult], dict[str, np.ndarray]]:
    """A chunk's uploads as one flat numpy buffer per dtype, for the trip back to the coordinator.

    Each upload's tensors become a layout into those buffers (:func:`flat.pack_many`): Ray
    ships a few large buffers out of band (zero-copy) instead of pickling one array per
    tensor per client, which on a tiny model cost more than the coordinator's whole aggregation.
    """
    wires, buffers = flat.pack_many([r.output.upload.tensors for r in results if r.output is not None])
    next_wire = iter(wires)
    out: list[FitResult] = []
    for r in results:
        if r.output is None:
            out.append(r)
            continue
        wire = cast(Params, next(next_wire))  # a layout, not tensors, until unpack_results
        out.append(replace(r, output=replace(r.output, upload=replace(r.output.upload, tensors=wire))))
    return out, buffers


def unpack_results(results: Sequence[FitResult], buffers: Mapping[str, np.ndarray]) -> list[FitResult]:
    """Inverse of :func:`pack_results` on the coordinator: :class:`flat.FlatParams` views of the
    buffers, no copy (read-only object-store memory: aggregation reads the uploads, nobody
    writes them), which :class:`StreamingMean` sums a buffer at a time."""
    out: list[FitResult] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns once about read-only numpy arrays
        bufs = {dt: torch.from_numpy(b) for dt, b in buffers.items()}
    for r in results:
        if r.output is None:
            out.append(r)
            continue
        up = r.output.upload
        tensors = flat.from_buffers(cast(flat.Wire, up.tensors), bufs)
        out.append(replace(r, output=replace(r.output, upload=replace(up, tensors=tensors))))
    return out


def pack_message(msg: Message) -> tuple[Message, flat.Wire, dict[str, np.ndarray]] | Message:
    """A payload for ``ray.put``: its tensors as numpy buffers (put without pickling a tensor
    at a time), the rest of the message as it is; a message numpy cannot hold (bfloat16)
    travels as it is."""
    try:
        layout, buffers = flat.to_buffers(msg.tensors)
    except (TypeError, RuntimeError):
        return msg
    return replace(msg, tensors={}), layout, buffers


def unpack_message(packed: tuple[Message, flat.Wire, dict[str, np.ndarray]] | Message) -> Message:
    """Inverse of :func:`pack_message` on a client actor: a writable copy (client code owns
    its payload; the object store's copy is read-only)."""
    if isinstance(packed, Message):
        return packed
    msg, layout, buffers = packed
    return replace(msg, tensors=flat.from_buffers(layout, buffers, copy=True))


def freeze_heap() -> None:
    """Move everything a worker holds after its set-up out of the garbage collector's sight.

    A Ray worker with torch loaded holds a few hundred thousand long-lived objects; every
    full collection (triggered by the many short-lived objects a training step makes)
    walked them all again, about a tenth of a tiny client's training time. Frozen
    objects are never collected, so this runs once, when the long-lived state is built, and
    without a collection first (one costs about 70 ms there, on the way to round 0).
    """
    import gc

    gc.freeze()


def train_work(n_train: int, train: TrainConfig) -> int:
    """Samples a client's local training processes: its split times the epochs, capped by
    ``max_steps`` batches. What balances actor calls (and the benchmark's parallel floor)."""
    work = n_train * train.local_epochs
    return work if train.max_steps is None else min(work, train.max_steps * train.batch_size)


MAX_CHUNK = 64  # clients per actor call at most (adaptive chunking)
TARGET_CHUNK_S = 0.1  # adaptive chunking: work that lasts longer is split into calls of about this long


def balanced_chunks(idx: Sequence[int], costs: Sequence[float], n_actors: int,
                    max_chunk: int = MAX_CHUNK, min_chunks: int = 0) -> list[list[int]]:
    """Job indices in about one chunk per actor, balanced by cost (greedy longest-first).

    Each job goes, heaviest first, to the chunk with the least work so far (ties:
    the lower chunk); every chunk keeps its jobs in their original order. At least
    ``n_actors`` chunks (and ``min_chunks``, when the work is worth splitting finer
    so that faster actors can take more of it), more when a chunk would pass
    ``max_chunk`` jobs; the executor feeds them as actors free up. Deterministic
    for given inputs; metrics never depend on it (a client's training does not
    depend on which call trains it).
    """
    n = len(idx)
    if n == 0:
        return []
    a = max(n_actors, 1)
    k = max(1, min(n, max(a * -(-n // (a * max_chunk)), min_chunks)))
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(0.0, b) for b in range(k)]  # (work so far, chunk): the least loaded on top
    for j in sorted(range(n), key=lambda j: (-costs[j], j)):
        load, b = heapq.heappop(heap)
        bins[b].append(idx[j])
        if len(bins[b]) < max_chunk:  # a full chunk takes no more jobs (k * max_chunk >= n)
            heapq.heappush(heap, (load + costs[j], b))
    return [sorted(b) for b in bins if b]


class _ClientActor:
    """Ray actor body: a ClientRunner plus where it runs (for reporting).

    Created before the data exists (the process boots while the coordinator loads
    it); every call carries the data's object refs, un-resolved, and the first one
    that finds no runner (also after a restart) builds it from them.
    """

    def __init__(self, cfg_json: str, store_root: str, class_name: str) -> None:
        import ray
        import torch

        from cafe_ray.config import ExperimentConfig
        from cafe_ray.sim.device import actor_device

        torch.set_num_threads(1)  # once, not per job: deterministic and no oversubscription
        ctx = ray.get_runtime_context()
        self.worker_info = {
            "pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
            "resource_class": class_name, "resources": dict(ctx.get_assigned_resources()),
            "executor": "ray",
        }
        self.cfg = ExperimentConfig.model_validate_json(cfg_json)
        self.store_root = store_root
        from pathlib import Path

        from cafe_ray.runs import rundir

        # warnings reach the driver through <run dir>/warnings.jsonl (the store lies in the run dir)
        rundir.capture_warnings(Path(store_root).parent, f"client actor {class_name}")
        # the device follows the GPUs Ray assigned to this actor (cafe_ray.sim.device)
        choice = actor_device(self.cfg.engine.gpu_standin)
        self.worker_info.update(device=choice.device, device_note=choice.note)
        if choice.gpu_ids and choice.device == "cpu" and not self.cfg.engine.gpu_standin:
            warnings.warn(f"resource class {class_name}: {choice.note}", stacklevel=1)
        self.device = choice.device
        self.runner: ClientRunner | None = None

    def attach(self, data_refs: list) -> bool:
        if self.runner is None:
            import ray

            dataset, splits = ray.get(data_refs)
            self.runner = ClientRunner(self.cfg, dataset, splits, self.store_root, worker_info=self.worker_info,
                                       device=self.device)
            freeze_heap()
        return True

    def fit_chunk(self, data_refs: list, jobs: list[FitJob], pidx: list[int],
                  *payloads) -> tuple[list[FitResult], dict[str, np.ndarray]]:
        """Train a chunk of virtual clients (one batched cohort under engine.vectorize); uploads
        come back as flat numpy buffers (:func:`pack_results`)."""
        self.attach(data_refs)
        msgs = [unpack_message(p) for p in payloads]
        full = [replace(j, payload=msgs[k]) for j, k in zip(jobs, pidx, strict=True)]
        return pack_results(attached(self.runner).fit_many(full))

    def evaluate_chunk(self, data_refs: list, jobs: list[EvalJob], pidx: list[int], *payloads) -> list[EvalResult]:
        self.attach(data_refs)
        msgs = [unpack_message(p) for p in payloads]
        return [attached(self.runner).evaluate(replace(j, payload=msgs[k]))
                for j, k in zip(jobs, pidx, strict=True)]

    def info(self) -> dict:
        return self.worker_info


class RayExecutor(Executor):
    def __init__(self, cfg: ExperimentConfig, dataset: ArrayDataset | None, splits: Sequence[ClientSplit] | None,
                 store_root: str, classes: Sequence[ResourceClass], client_class: Mapping[int, str],
                 in_flight_per_actor: int = 2, data_refs: list | None = None) -> None:
        """``data_refs``: [dataset ref, splits ref] already in the object store (the driver put
        what preflight loaded); attach() then uses them instead of putting the data again."""
        import ray

        self.ray = ray
        self.client_class = client_class
        self.depth = in_flight_per_actor
        self.chunk_clients = cfg.engine.chunk_clients
        self.vectorize = cfg.engine.vectorize != "off"
        self._data_refs: list | None = None  # [dataset ref, splits ref], set by attach()
        self._splits: Sequence[ClientSplit] | None = None  # for the jobs' costs (balanced chunks)
        self._train = cfg.train
        self._rate: dict[str, float] = {}  # pool -> seconds per unit of work, from the last round
        self._attached: list = []  # each actor's attach() call: done once Ray placed the actor
        self._given_refs = data_refs
        self.capacity, self.capacity_source = fit_capacity()
        self.wanted = list(classes)  # pools at full size; check_fits may shrink them
        self.notes: list[str] = []  # autoscaling / shrinking messages (also on stderr)
        self._scaled = self.capacity_source == "cluster"  # not inside a Tune trial's placement group
        if self._scaled:  # ask the autoscaler for the nodes the pools need first (autoscale.py)
            self.capacity = autoscale.scale_for(self.wanted, cfg.profiles.autoscale_timeout_s, self._note)
        try:
            self.classes = check_fits(classes, self.capacity)
        except ValueError as err:
            if self.capacity_source == "cluster":
                raise
            raise ValueError(f"{err} (here 'the cluster' is the placement group this process runs in, "
                             "e.g. a Tune trial's, which cafe_ray.studies.sweep sizes from the resolved catalog)") from None
        note = autoscale.shrink_note(self.wanted, self.classes)
        if note:
            self._note(note)
        # what a new actor needs (pools also grow mid-run, see _grow); the data travels with
        # each call (attach), so actors start before it is loaded
        self._actor_args = (cfg.model_dump_json(), store_root)
        self._actor_cls = ray.remote(_ClientActor)
        self._actor_node: dict[tuple[str, int], str | None] = {}  # (class, index) -> node it last ran on
        self.pools: dict[str, list] = {}
        # pinned pools (custom resources, GPUs) are requested first, so that unpinned
        # actors do not take the CPUs of the only nodes a pinned class can use
        for c in sorted(self.classes, key=lambda c: not (c.resources or c.num_gpus)):
            self.pools[c.name] = [self._new_actor(c) for _ in range(c.actors or 1)]
        self.restarts_seen = 0  # actors seen back after dying
        self._down: set[tuple[str, int]] = set()  # (class, actor index) known dead
        self._probes: dict[tuple[str, int], object] = {}  # down actor -> pending info() call
        if dataset is not None and splits is not None:
            self.attach(dataset, splits)

    def attach(self, dataset: ArrayDataset, splits: Sequence[ClientSplit]) -> tuple[ArrayDataset, Sequence[ClientSplit]]:
        """Put the data once (zero-copy numpy in every actor on this node); actors load it now.

        Returns the object store's views, so the caller can drop its own copy. With
        ``data_refs`` given, ``dataset`` and ``splits`` are those refs' views already.
        """
        given = self._given_refs is not None
        self._data_refs = self._given_refs if given else [self.ray.put(dataset), self.ray.put(splits)]
        for pool in self.pools.values():
            for a in pool:
                self._attached.append(a.attach.remote(self._data_refs))  # ordered before any chunk on that actor
        kept = (dataset, splits) if given else tuple(self.ray.get(self._data_refs))
        self._splits = kept[1]
        return kept

    def _new_actor(self, c: ResourceClass) -> Any:  # an actor handle
        actor = self._actor_cls.options(max_restarts=-1, max_task_retries=0, **c.ray_options()).remote(
            *self._actor_args, c.name)
        if self._data_refs is not None:  # a pool grown mid-run: load the data as attach() did
            self._attached.append(actor.attach.remote(self._data_refs))
        return actor

    def _note(self, msg: str) -> None:
        import sys

        self.notes.append(msg)
        print(f"cafe-ray: {msg}", file=sys.stderr, flush=True)

    def _grow(self) -> None:
        """Add actors to pools that were shrunk, as far as the cluster's free resources allow
        (nodes the standing autoscaler request brought up after the pools were built)."""
        if all(len(self.pools.get(c.name, [])) >= (c.actors or 1) for c in self.wanted):
            return
        # free resources count only once every actor created so far holds its own: one that Ray
        # has not placed yet still shows its CPUs as available, and growing on them would add
        # actors that can never be scheduled, whose chunks would wait forever
        if not self._attached:
            return
        done, _ = self.ray.wait(self._attached, num_returns=len(self._attached), timeout=0)
        if len(done) < len(self._attached):
            return
        current = {name: len(pool) for name, pool in self.pools.items()}
        add = autoscale.grow_plan(current, self.wanted, dict(self.ray.available_resources()))
        for c in self.wanted:
            for _ in range(add.get(c.name, 0)):
                self.pools.setdefault(c.name, []).append(self._new_actor(c))
        if add:
            self._note("nodes joined; pools grown: " + ", ".join(
                f"{name} {current.get(name, 0)} -> {len(self.pools[name])}" for name in sorted(add)))

    def actor_info(self) -> list[dict]:
        return self.ray.get([a.info.remote() for pool in self.pools.values() for a in pool])

    def _cost(self, job: FitJob | EvalJob) -> float:
        """The work a job brings: the samples it trains on (fit) or scores (evaluation)."""
        if self._splits is None:
            return 1.0
        sp = self._splits[job.client_id]  # ClientSplits: views into its CSR arrays, O(1)
        if isinstance(job, EvalJob):
            return float(len(sp.test_idx) + len(sp.val_idx))
        return float(train_work(len(sp.train_idx), self._train))

    def _chunks(self, jobs: Sequence, idx: list[int], n_actors: int, method: str, name: str) -> list[list[int]]:
        """A pool's jobs as actor calls: balanced, one per actor (see :func:`balanced_chunks`),
        or runs of engine.chunk_clients.

        Training cohorts (engine.vectorize) are set by the round's jobs and the cohort size
        alone, never by the number of actors: a batched cohort's float rounding depends on
        its members, so the same cohorts must form on every executor.
        """
        if method == "fit" and self.vectorize:  # the cohorts split_cohorts makes on every executor
            from cafe_ray.sim.cohort import cohort_runs, cohort_size

            # by local work, as the sequential executor's: _cost of a fit job is train_work
            return cohort_runs(idx, cohort_size(self.chunk_clients), lambda i: self._cost(jobs[i]))
        if self.chunk_clients:
            c = self.chunk_clients
        else:  # adaptive
            costs = [self._cost(jobs[i]) for i in idx]
            rate = self._rate.get(name) if method == "fit" else None
            # once a round has shown what a unit of work takes here, split work that lasts long
            # enough into chunks of about TARGET_CHUNK_S, fed to whichever actor is free: an actor
            # on a slower core (a busy host, a smaller CPU share) then takes fewer of them
            # (a whole number of chunks per actor: 3 chunks on 2 actors would leave one idle for a third)
            many = int(rate * sum(costs) / TARGET_CHUNK_S) if rate else 0
            return balanced_chunks(idx, costs, n_actors, min_chunks=n_actors * -(-many // n_actors))
        return [idx[s:s + c] for s in range(0, len(idx), c)]

    def _learn_rate(self, jobs: Sequence[FitJob], results: Sequence[FitResult | None]) -> None:
        """Seconds per unit of work (:meth:`_cost`) in each pool, from the clients just trained:
        the median client's, so that one client's first-call warm-up does not count."""
        rates: dict[str, list[float]] = {}
        for j, r in zip(jobs, results, strict=True):
            work = self._cost(j)
            if r is not None and r.output is not None and work > 0:
                rates.setdefault(self.client_class.get(j.client_id), []).append(r.wall_s / work)
        for name, xs in rates.items():
            self._rate[name] = float(np.median(xs))

    def _dispatch(self, jobs: Sequence, method: str) -> list:
        """Feed each pool's live actors at most ``depth`` chunks at a time; collect in job order.

        A chunk is a run of one class's jobs trained by one actor call. A chunk whose
        actor dies fails (fit) or is queued again (evaluation, which has no side
        effects); the dead actor gets no more work until Ray has restarted it and it
        answers, so one crash costs the jobs it held, not the rest of the round.
        """
        ray = self.ray
        if self._data_refs is None:
            raise RuntimeError("RayExecutor: attach(dataset, splits) must run before the first round")
        by_class: dict[str, list[int]] = {name: [] for name in self.pools}
        for i, j in enumerate(jobs):
            cls = self.client_class.get(j.client_id)
            if cls not in by_class:
                raise KeyError(f"client {j.client_id} has resource class {cls!r} with no actor pool")
            by_class[cls].append(i)
        queues: dict[str, deque[list[int]]] = {}
        for name, idx in by_class.items():
            alive = sum((name, k) not in self._down for k in range(len(self.pools[name])))
            queues[name] = deque(self._chunks(jobs, idx, max(1, alive), method, name))
        results: list = [None] * len(jobs)
        attempts: dict[int, int] = {}  # first job index of a chunk -> tries
        in_flight: dict = {}  # ref -> (job indices, class, actor index)
        load = {name: [0] * len(pool) for name, pool in self.pools.items()}
        put_cache: dict[int, object] = {}  # id(payload) -> ref: an identical payload is put once

        def payload_ref(payload: object) -> object:
            key = id(payload)
            if key not in put_cache:
                put_cache[key] = ray.put(pack_message(payload) if isinstance(payload, Message) else payload)
            return put_cache[key]

        def feed(name: str) -> None:
            pool, q = self.pools[name], queues[name]
            while q:
                alive = [k for k in range(len(pool)) if (name, k) not in self._down]
                if not alive:
                    self._revive(name)
                    continue
                a = min(alive, key=lambda k: load[name][k])
                if load[name][a] >= self.depth:
                    return
                chunk = q.popleft()
                refs: list = []
                pidx: list[int] = []
                for i in chunk:
                    r = payload_ref(jobs[i].payload)
                    if r not in refs:
                        refs.append(r)
                    pidx.append(refs.index(r))
                light = [replace(jobs[i], payload=None) for i in chunk]
                ref = getattr(pool[a], f"{method}_chunk").remote(self._data_refs, light, pidx, *refs)
                in_flight[ref] = (chunk, name, a)
                load[name][a] += 1
                attempts[chunk[0]] = attempts.get(chunk[0], 0) + 1

        self._revive_all()
        for name in self.pools:
            feed(name)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                chunk, name, a = in_flight.pop(ref)
                load[name][a] -= 1
                try:
                    out = ray.get(ref)
                    if method == "fit":
                        out = unpack_results(*out)
                    for i, r in zip(chunk, out, strict=True):
                        results[i] = r
                    worker = getattr(out[0], "worker", None) if out else None
                    if worker:
                        self._actor_node[(name, a)] = worker.get("node_id")
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self._down.add((name, a))
                    if isinstance(jobs[chunk[0]], FitJob):  # node: where this actor last answered from
                        for i in chunk:
                            results[i] = FitResult(jobs[i].client_id, jobs[i].round, None,
                                                   error=f"worker died: {type(err).__name__}",
                                                   worker={"node_id": self._actor_node.get((name, a))})
                    elif attempts[chunk[0]] < 3:
                        queues[name].append(chunk)
                    else:
                        raise RuntimeError(f"evaluation of clients {[jobs[i].client_id for i in chunk]} lost "
                                           f"its worker three times: {err}") from None
                except ray.exceptions.RayTaskError as err:
                    raise err.as_instanceof_cause() from None
                if self._down:  # a restarted actor rejoins mid-round, not only at the next dispatch
                    self._revive_all()
                    for other in self.pools:
                        feed(other)
                else:
                    feed(name)
        return results

    def _revive(self, name: str, timeout_s: float = 300.0) -> None:
        """Wait until every down actor of pool ``name`` answers again (Ray restarts it)."""
        import time

        deadline = time.monotonic() + timeout_s
        for key in sorted(k for k in self._down if k[0] == name):
            actor = self.pools[name][key[1]]
            while True:
                try:
                    self._actor_node[key] = self.ray.get(actor.info.remote(), timeout=30).get("node_id")
                    break
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError,
                        self.ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"client actor {name}[{key[1]}] did not come back within "
                                           f"{timeout_s:.0f}s after dying") from None
                    time.sleep(0.5)
            self._down.discard(key)
            self._probes.pop(key, None)
            self.restarts_seen += 1

    def _revive_all(self) -> None:
        """Before a dispatch: a pool with no live actor waits for Ray to restart one; a pool that
        still has live actors only checks, without waiting, whether its dead ones are back, so a
        node lost for good (a reclaimed spot instance) does not stall every later round."""
        for name in sorted({n for n, _ in self._down}):
            down = sorted(k for k in self._down if k[0] == name)
            if len(down) >= len(self.pools[name]):
                self._revive(name)
                continue
            for key in down:
                probe = self._probes.get(key)
                if probe is None:
                    self._probes[key] = self.pools[name][key[1]].info.remote()
                    continue
                ready, _ = self.ray.wait([probe], timeout=0)
                if not ready:
                    continue
                del self._probes[key]
                try:
                    self._actor_node[key] = self.ray.get(probe).get("node_id")
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
                    # still down (a call made while Ray restarts it fails): probe again now, so the
                    # answer is there at the next check (dispatch or a finished chunk)
                    self._probes[key] = self.pools[name][key[1]].info.remote()
                    continue
                self._down.discard(key)
                self.restarts_seen += 1

    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        if self._scaled:
            self._grow()
        results = self._dispatch(jobs, "fit")
        if not (self.vectorize or self.chunk_clients):  # only adaptive chunking reads the rate
            self._learn_rate(jobs, results)
        return results

    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        return self._dispatch(jobs, "evaluate")

    def shutdown(self) -> None:
        for pool in self.pools.values():
            for a in pool:
                self.ray.kill(a)
        self.pools = {}
        if self._scaled:
            autoscale.release()  # idle nodes may go after the cluster's idle_timeout_minutes
