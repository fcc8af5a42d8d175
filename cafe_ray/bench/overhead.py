"""Engine overhead against a fair floor: the same FedAvg-EE training and evaluation, no engine.

The floor is a bare single-process loop with the same thread count per worker as
the engine's client actors (1), calling the same local-SGD and per-exit accuracy
functions with the same seeds, so it computes exactly what the engine computes
(its final accuracies equal the engine's: the benchmark checks it) and nothing
else: no Ray, no state store, no accounting, no files. With W single-threaded
workers the best any engine can do is floor / W (the *ideal parallel floor*);
the benchmark reports the engine against it.

Runs alternate engine and floor and repeat; min and median are reported with
the machine's 1-minute load average before each run, because on a shared
2-core machine a neighbour's burst moves single numbers by 2x.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cafe_ray.config import ExperimentConfig, build_config


def load_avg() -> float:
    return os.getloadavg()[0]


@dataclass(frozen=True)
class EngineTiming:
    end_to_end_s: float  # run_simulation(): coordinator + actors + data + rounds + final files
    rounds_s: float  # sum of the rounds' wall_s (training, aggregation, evaluation)
    steady_s: float  # rounds after round 0 (which waits for the actors to start)
    acc_exit: tuple[float, ...]
    load: float


@dataclass(frozen=True)
class FloorTiming:
    loop_s: float  # training + evaluation, data already in memory
    acc_exit: tuple[float, ...]
    load: float


@dataclass
class OverheadResult:
    label: str
    client_rounds: int
    workers: int
    per_round: int = 1
    engine: list[EngineTiming] = field(default_factory=list)
    floor: list[FloorTiming] = field(default_factory=list)
    parallel: list[float] = field(default_factory=list)  # parallel_floor() seconds, one per repeat

    @property
    def floor_min(self) -> float:
        return min(f.loop_s for f in self.floor)

    @property
    def floor_median(self) -> float:
        return statistics.median(f.loop_s for f in self.floor)

    @property
    def ideal_min(self) -> float:
        """floor / workers: W single-threaded workers with zero overhead."""
        return self.floor_min / self.workers

    def engine_rounds(self, stat: str = "min") -> float:
        xs = [e.rounds_s for e in self.engine]
        return min(xs) if stat == "min" else statistics.median(xs)

    def engine_e2e(self, stat: str = "min") -> float:
        xs = [e.end_to_end_s for e in self.engine]
        return min(xs) if stat == "min" else statistics.median(xs)

    def steady_ratio(self, stat: str = "min") -> float:
        """Rounds 2..T against the same share of the ideal floor (no start-up in either)."""
        xs = [e.steady_s for e in self.engine]
        eng = min(xs) if stat == "min" else statistics.median(xs)
        floor = self.floor_min if stat == "min" else self.floor_median
        rounds = self.client_rounds // max(1, self.per_round)
        return eng / (floor / self.workers * (rounds - 1) / rounds)

    def steady_vs_parallel(self, stat: str = "min") -> float:
        """Rounds 2..T against the same share of the measured parallel floor."""
        xs = [e.steady_s for e in self.engine]
        eng = min(xs) if stat == "min" else statistics.median(xs)
        par = min(self.parallel) if stat == "min" else statistics.median(self.parallel)
        rounds = self.client_rounds // max(1, self.per_round)
        return eng / (par * (rounds - 1) / rounds)

    def above_ideal_ms(self, stat: str = "min") -> float:
        """Engine round time above the ideal parallel floor, per client-round."""
        floor = self.floor_min if stat == "min" else self.floor_median
        return 1000 * (self.engine_rounds(stat) - floor / self.workers) / self.client_rounds

    def ratio(self, stat: str = "min") -> float:
        """Engine rounds / ideal parallel floor (1.0 = no overhead at all)."""
        floor = self.floor_min if stat == "min" else self.floor_median
        return self.engine_rounds(stat) / (floor / self.workers)

    @property
    def max_acc_diff(self) -> float:
        """Largest per-exit accuracy difference between any engine run and any floor run
        (0 = the same computation; engine.vectorize differs only by float rounding)."""
        return max(abs(a - b) for e in self.engine for f in self.floor
                   for a, b in zip(e.acc_exit, f.acc_exit, strict=True))


def workload(dataset: str, clients: int, rounds: int, epochs: int, max_steps: int | None,
             width: int, max_train: int | None, out: str, actors: int = 2,
             **engine: object) -> ExperimentConfig:
    """FedAvg-EE, every client every round, evaluation of every client at the last round."""
    return build_config({
        "name": f"bench-{dataset}", "seed": 0, "output_dir": out,
        "data": {"name": dataset, "num_clients": clients, "max_train_samples": max_train,
                 "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
                 "synthetic_samples": 20 * clients, "synthetic_shape": [1, 8, 8]},
        "model": {"name": "cnn_small", "width": width},
        "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": epochs, "batch_size": 32, "lr": 0.05, "max_steps": max_steps},
        "round": {"num_rounds": rounds, "fraction": 1.0, "eval_every": 10_000, "eval_clients": "all"},
        "profiles": {"catalog": "uniform", "actors_per_class": actors},
        "checkpoint": {"every": 10_000},
        "engine": dict(engine),
    })


def floor_loop(cfg: ExperimentConfig, threads: int = 1, clients: Sequence[int] | None = None,
               ready: Callable[[], object] | None = None) -> FloorTiming:
    """The workload as a bare loop: same training and evaluation calls, no engine.

    ``clients``: only these clients (a share of the work, see :func:`parallel_floor`);
    ``ready``: called once everything is loaded, just before the clock starts.
    """
    from cafe_ray.algorithms.aggregation import StreamingMean
    from cafe_ray.algorithms.base import ClientContext, ClientData, load_params
    from cafe_ray.algorithms.training import exit_accuracies, local_sgd
    from cafe_ray.data import load_dataset, partition_clients
    from cafe_ray.models import make_model
    from cafe_ray.sim import seeds
    from cafe_ray.sim.executor import freeze_heap

    load = load_avg()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ds = load_dataset(cfg.data, seed=cfg.seed)
        splits = list(partition_clients(ds, cfg.data, seed=cfg.seed))
        if clients is not None:
            keep = set(clients)
            splits = [s for s in splits if s.client_id in keep]
        model = make_model(cfg, ds)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        glob = {k: v.clone() for k, v in init.items()}

        def data(s) -> ClientData:
            return ClientData(torch.from_numpy(ds.x_train[s.train_idx]), torch.from_numpy(ds.y_train[s.train_idx]),
                              torch.from_numpy(ds.x_test[s.test_idx]), torch.from_numpy(ds.y_test[s.test_idx]))

        T = cfg.round.num_rounds
        freeze_heap()  # as the engine's workers do: collections skip this process's long-lived objects
        if ready is not None:
            ready()
        t0 = time.perf_counter()
        for t in range(T):
            mean = StreamingMean()
            for s in splits:
                model.load_state_dict(init)
                load_params(model, glob)
                d = data(s)
                ctx = ClientContext(s.client_id, t, T, seeds.derive_seed(cfg.seed, t, s.client_id, seeds.TRAIN))
                local_sgd(model, d, ctx, cfg.train)
                sd = model.state_dict()
                mean.add({k: sd[k].detach().clone() for k in glob}, float(d.num_train))
            glob = mean.result(like=glob)
        correct = torch.zeros(model.num_exits, dtype=torch.float64)
        n = 0
        for s in splits:  # the engine's last-round evaluation: every client, its own test split
            model.load_state_dict(init)
            load_params(model, glob)
            d = data(s)
            accs = exit_accuracies(model, d.x_test, d.y_test)
            m = len(d.y_test)
            correct += torch.tensor([round(a * m) for a in accs], dtype=torch.float64)
            n += m
        loop_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
        gc.unfreeze()
    return FloorTiming(loop_s, tuple(float(c / n) for c in correct), load)


def _share(cfg_json: str, clients: list[int], barrier: Any, out: Any) -> None:
    """One process of :func:`parallel_floor` (module level: spawn pickles it by name)."""
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    out.put(floor_loop(cfg, clients=clients, ready=barrier.wait).loop_s)  # a multiprocessing Barrier and Queue


def parallel_floor(cfg: ExperimentConfig, workers: int) -> float:
    """W bare loops running at once, each on its share of the clients: the slowest one's time.

    The shares are the engine's first-round split (one call per actor, balanced by samples).
    Each process averages only its own clients (there is no exchange between them), so a
    round's arithmetic is the engine's while the weights differ; the time of these
    computations does not depend on the weights' values. Where floor / W assumes that W busy
    cores each run as fast as one alone, this measures what the machine's W cores deliver
    at once (a busy host, shared caches), as the engine's actors meet it. Every process
    loads the data and starts the clock at one barrier.
    """
    import multiprocessing as mp
    import queue

    from cafe_ray.data import load_dataset, partition_clients
    from cafe_ray.sim.executor import balanced_chunks, train_work

    ds = load_dataset(cfg.data, seed=cfg.seed)
    splits = list(partition_clients(ds, cfg.data, seed=cfg.seed))
    work = [train_work(len(s.train_idx), cfg.train) for s in splits]
    shares = balanced_chunks([s.client_id for s in splits], work, workers)
    ctx = mp.get_context("spawn")
    # a process that dies before the barrier breaks it for the others after the timeout
    barrier, out = ctx.Barrier(len(shares), timeout=600), ctx.Queue()
    procs = [ctx.Process(target=_share, args=(cfg.model_dump_json(), share, barrier, out)) for share in shares]
    for p in procs:
        p.start()
    times: list[float] = []
    try:
        while len(times) < len(procs):
            try:
                times.append(out.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a crash in a share (its traceback is above) ends the benchmark, not a hang
                    raise RuntimeError(f"parallel floor: a share's process exited with code {dead[0]}; "
                                       "run with --no-parallel to skip this measurement") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    return max(times)


def engine_run(cfg: ExperimentConfig) -> EngineTiming:
    """The workload through the engine (Ray already started)."""
    from rich.console import Console

    from cafe_ray.sim.engine import run_simulation

    load = load_avg()
    t0 = time.perf_counter()
    run_dir, summary = run_simulation(cfg, show_progress=False, console=Console(quiet=True))
    e2e = time.perf_counter() - t0
    from cafe_ray.runs import rundir

    walls = [float(r["wall_s"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS)]
    return EngineTiming(e2e, sum(walls), sum(walls[1:]), tuple(summary["acc_exit"]), load)


def measure(label: str, cfg: ExperimentConfig, repeats: int = 3, parallel: bool = True) -> OverheadResult:
    """Alternate engine, floor and (``parallel``) the parallel floor ``repeats`` times."""
    res = OverheadResult(label, cfg.data.num_clients * cfg.round.num_rounds,
                         workers=cfg.profiles.actors_per_class, per_round=cfg.data.num_clients)
    for _ in range(repeats):
        res.engine.append(engine_run(cfg))
        res.floor.append(floor_loop(cfg))
        if parallel:
            res.parallel.append(parallel_floor(cfg, res.workers))
    return res


@dataclass(frozen=True)
class CohortResult:
    clients: int
    plain_s: float  # ClientRunner.fit, one client after the other, 1 thread (the floor's training)
    cohort_s: float  # ClientRunner.fit_many: one batched cohort (engine.vectorize)
    max_param_diff: float
    load: float


def cohort_vs_plain(cfg: ExperimentConfig, repeats: int = 3) -> list[CohortResult]:
    """The training of one round's clients in one process, 1 thread: per client vs one cohort.

    No Ray and no engine: what engine.vectorize changes in the compute itself.
    Alternates plain and cohort ``repeats`` times.
    """
    import tempfile

    from cafe_ray.algorithms import RoundContext, build_algorithm
    from cafe_ray.data import load_dataset, partition_clients
    from cafe_ray.models import make_model
    from cafe_ray.sim import seeds
    from cafe_ray.sim.runner import ClientRunner, FitJob

    n = cfg.data.num_clients
    vec_cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"vectorize": "on"})})
    ds = load_dataset(cfg.data, seed=cfg.seed)
    splits = partition_clients(ds, cfg.data, seed=cfg.seed)
    alg = build_algorithm(cfg)
    payloads = alg.server_payloads(alg.init_server_state(make_model(cfg, ds)), RoundContext(0, 1, 0, tuple(range(n))))
    jobs = [FitJob(i, 0, 1, seeds.derive_seed(cfg.seed, 0, i, seeds.TRAIN), payload=payloads[i]) for i in range(n)]
    out = []
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = ClientRunner(cfg, ds, splits, tempfile.mkdtemp())
        vec = ClientRunner(vec_cfg, ds, splits, tempfile.mkdtemp())
        plain.fit(jobs[0])  # warm-up (first-call allocations) outside the timing
        vec.fit_many(jobs)  # and the cohort's: builds (and checks) the wide network once per cohort size
        for _ in range(repeats):
            load = load_avg()
            t = time.perf_counter()
            a = [plain.fit(j) for j in jobs]
            plain_s = time.perf_counter() - t
            t = time.perf_counter()
            b = vec.fit_many(jobs)
            cohort_s = time.perf_counter() - t
            diff = max(float((x.output.upload.tensors[k] - y.output.upload.tensors[k]).abs().max())
                       for x, y in zip(a, b, strict=True) for k in x.output.upload.tensors)
            out.append(CohortResult(n, plain_s, cohort_s, diff, load))
    finally:
        torch.set_num_threads(prev)
    return out
