"""Two executors behind one interface: in-process sequential, and Ray actor pools.

The round loop (cafe_ray.sim.simulation) says *what* runs; an executor decides
*how*. Same seeds, same results on both (a test checks it).

Ray: one bounded pool of client actors per resource class, each actor running
many virtual clients in turn with that class's Ray resources. The dataset goes
to the object store once; an identical payload is put once per round. An actor
that dies mid-round is restarted by Ray; the jobs it held count as failed.

Inside a placement group that captures child tasks (a Ray Tune trial), the pools
are fitted to that group's bundles, not to the whole cluster, so concurrent
trials never oversubscribe the machine.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from cafe_ray.config import ExperimentConfig
from cafe_ray.data.base import ArrayDataset, ClientSplit
from cafe_ray.sim.profiles import ResourceClass, check_fits
from cafe_ray.sim.runner import ClientRunner, EvalJob, EvalResult, FitJob, FitResult


class Executor(ABC):
    @abstractmethod
    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        """Results in job order; a client whose worker died has ``output=None``."""

    @abstractmethod
    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        """Results in job order."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass


class SequentialExecutor(Executor):
    """Runs every client in this process, one after the other: for debugging."""

    def __init__(self, cfg: ExperimentConfig, dataset: ArrayDataset, splits: list[ClientSplit], store_root: str) -> None:
        self.runner = ClientRunner(cfg, dataset, splits, store_root,
                                   worker_info={"pid": os.getpid(), "executor": "sequential"})

    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        return [self.runner.fit(j) for j in jobs]

    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        return [self.runner.evaluate(j) for j in jobs]


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


class _ClientActor:
    """Ray actor body: a ClientRunner plus where it runs (for reporting)."""

    def __init__(self, cfg_json: str, dataset: ArrayDataset, splits: list[ClientSplit],
                 store_root: str, class_name: str) -> None:
        import ray

        from cafe_ray.config import ExperimentConfig

        ctx = ray.get_runtime_context()
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
            "resource_class": class_name, "resources": dict(ctx.get_assigned_resources()),
            "executor": "ray",
        }
        cfg = ExperimentConfig.model_validate_json(cfg_json)
        self.runner = ClientRunner(cfg, dataset, splits, store_root, worker_info=info)

    def fit(self, job: FitJob, payload) -> FitResult:  # noqa: ANN001 - resolved ObjectRef
        return self.runner.fit(replace(job, payload=payload))

    def evaluate(self, job: EvalJob, payload) -> EvalResult:  # noqa: ANN001
        return self.runner.evaluate(replace(job, payload=payload))

    def info(self) -> dict:
        return self.runner.worker_info


class RayExecutor(Executor):
    def __init__(self, cfg: ExperimentConfig, dataset: ArrayDataset, splits: list[ClientSplit],
                 store_root: str, classes: Sequence[ResourceClass], client_class: dict[int, str],
                 in_flight_per_actor: int = 2) -> None:
        import ray

        self.ray = ray
        self.client_class = client_class
        self.depth = in_flight_per_actor
        self.capacity, self.capacity_source = fit_capacity()
        try:
            self.classes = check_fits(classes, self.capacity)
        except ValueError as err:
            if self.capacity_source == "cluster":
                raise
            raise ValueError(f"{err} (here 'the cluster' is the placement group this process runs in, "
                             "e.g. a Tune trial's, which cafe_ray.studies.sweep sizes from the resolved catalog)") from None
        ds_ref = ray.put(dataset)  # once: zero-copy numpy in every actor on this node
        splits_ref = ray.put(splits)
        actor_cls = ray.remote(_ClientActor)
        cfg_json = cfg.model_dump_json()
        self.pools: dict[str, list] = {}
        # pinned pools (custom resources, GPUs) are requested first, so that unpinned
        # actors do not take the CPUs of the only nodes a pinned class can use
        for c in sorted(self.classes, key=lambda c: not (c.resources or c.num_gpus)):
            self.pools[c.name] = [
                actor_cls.options(max_restarts=-1, max_task_retries=0, **c.ray_options()).remote(
                    cfg_json, ds_ref, splits_ref, store_root, c.name
                )
                for _ in range(c.actors or 1)
            ]
        self.restarts_seen = 0  # actors seen back after dying
        self._down: set[tuple[str, int]] = set()  # (class, actor index) known dead

    def actor_info(self) -> list[dict]:
        return self.ray.get([a.info.remote() for pool in self.pools.values() for a in pool])

    def _payload_refs(self, jobs: Sequence) -> list:
        cache: dict[int, object] = {}
        refs = []
        for j in jobs:
            key = id(j.payload)
            if key not in cache:
                cache[key] = self.ray.put(j.payload)
            refs.append(cache[key])
        return refs

    def _dispatch(self, jobs: Sequence, method: str) -> list:
        """Feed each pool's live actors at most ``depth`` jobs at a time; collect in job order.

        A job whose actor dies fails (fit) or is queued again (evaluation, which has no
        side effects); the dead actor gets no more work until Ray has restarted it and
        it answers, so one crash costs the jobs it held, not the rest of the round.
        """
        ray = self.ray
        payload_refs = self._payload_refs(jobs)
        queues: dict[str, deque[int]] = {name: deque() for name in self.pools}
        for i, j in enumerate(jobs):
            cls = self.client_class.get(j.client_id)
            if cls not in queues:
                raise KeyError(f"client {j.client_id} has resource class {cls!r} with no actor pool")
            queues[cls].append(i)
        results: list = [None] * len(jobs)
        attempts = [0] * len(jobs)
        in_flight: dict = {}  # ref -> (job index, class, actor index)
        load = {name: [0] * len(pool) for name, pool in self.pools.items()}

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
                i = q.popleft()
                job = replace(jobs[i], payload=None)
                ref = getattr(pool[a], method).remote(job, payload_refs[i])
                in_flight[ref] = (i, name, a)
                load[name][a] += 1
                attempts[i] += 1

        self._revive_all()
        for name in self.pools:
            feed(name)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                i, name, a = in_flight.pop(ref)
                load[name][a] -= 1
                try:
                    results[i] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self._down.add((name, a))
                    if isinstance(jobs[i], FitJob):
                        results[i] = FitResult(jobs[i].client_id, jobs[i].round, None,
                                               error=f"worker died: {type(err).__name__}")
                    elif attempts[i] < 3:
                        queues[name].append(i)
                    else:
                        raise RuntimeError(f"evaluation of client {jobs[i].client_id} lost its worker "
                                           f"three times: {err}") from None
                except ray.exceptions.RayTaskError as err:
                    raise err.as_instanceof_cause() from None
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
                    self.ray.get(actor.info.remote(), timeout=30)
                    break
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError,
                        self.ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"client actor {name}[{key[1]}] did not come back within "
                                           f"{timeout_s:.0f}s after dying") from None
                    time.sleep(0.5)
            self._down.discard(key)
            self.restarts_seen += 1

    def _revive_all(self) -> None:
        for name in sorted({n for n, _ in self._down}):
            self._revive(name)

    def run_fit(self, jobs: Sequence[FitJob]) -> list[FitResult]:
        return self._dispatch(jobs, "fit")

    def run_eval(self, jobs: Sequence[EvalJob]) -> list[EvalResult]:
        return self._dispatch(jobs, "evaluate")

    def shutdown(self) -> None:
        for pool in self.pools.values():
            for a in pool:
                self.ray.kill(a)
        self.pools = {}
