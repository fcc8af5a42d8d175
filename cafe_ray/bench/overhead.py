"""Engine overhead: the same FedAvg-EE workload through cafe-ray versus a bare loop.

The bare loop is what a researcher would write without a platform: one process,
no Ray, the global model copied into one local model per client, plain SGD, a
weighted average. Same clients, same local steps, same model, same seed. The
ratio engine/bare is printed; below 1.0 means the engine's parallel client
actors more than pay for its scheduling, storage and accounting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cafe_ray.config import ExperimentConfig, build_config
from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.sim import seeds
from cafe_ray.sim.runner import make_model


@dataclass(frozen=True)
class OverheadResult:
    label: str
    client_rounds: int
    bare_s: float
    engine_s: float

    @property
    def ratio(self) -> float:
        return self.engine_s / self.bare_s

    @property
    def overhead_ms_per_client_round(self) -> float:
        return 1000 * (self.engine_s - self.bare_s) / self.client_rounds


def workload(dataset: str, clients: int, rounds: int, epochs: int, max_steps: int | None,
             width: int, max_train: int | None, out: str) -> ExperimentConfig:
    return build_config({
        "name": f"bench-{dataset}", "seed": 0, "output_dir": out,
        "data": {"name": dataset, "num_clients": clients, "max_train_samples": max_train,
                 "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
                 "synthetic_samples": 20 * clients, "synthetic_shape": [1, 8, 8]},
        "model": {"name": "cnn_small", "width": width},
        "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": epochs, "batch_size": 32, "lr": 0.05, "max_steps": max_steps},
        "round": {"num_rounds": rounds, "fraction": 1.0, "eval_every": 10_000},
        "profiles": {"catalog": "uniform", "actors_per_class": 2},
        "checkpoint": {"every": 10_000},
    })


def bare_loop(cfg: ExperimentConfig) -> float:
    """Seconds for the workload in one plain PyTorch process (evaluation excluded)."""
    ds = load_dataset(cfg.data, seed=cfg.seed)
    splits = partition_clients(ds, cfg.data, seed=cfg.seed)
    model = make_model(cfg, ds)
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    xs = [torch.from_numpy(ds.x_train[s.train_idx]) for s in splits]
    ys = [torch.from_numpy(ds.y_train[s.train_idx]) for s in splits]
    tr = cfg.train
    t0 = time.perf_counter()
    for t in range(cfg.round.num_rounds):
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_sd.items()}
        total = 0
        for i in range(len(splits)):
            model.load_state_dict(global_sd)
            opt = torch.optim.SGD(model.parameters(), lr=tr.lr, momentum=tr.momentum)
            g = torch.Generator().manual_seed(seeds.derive_seed(cfg.seed, t, i))
            n, steps = len(ys[i]), 0
            for _ in range(tr.local_epochs):
                order = torch.randperm(n, generator=g)
                for s in range(0, n, tr.batch_size):
                    idx = order[s : s + tr.batch_size]
                    opt.zero_grad()
                    loss = sum(F.cross_entropy(z, ys[i][idx]) for z in model(xs[i][idx]))
                    loss.backward()
                    opt.step()
                    steps += 1
                    if tr.max_steps and steps >= tr.max_steps:
                        break
                if tr.max_steps and steps >= tr.max_steps:
                    break
            for k, v in model.state_dict().items():
                acc[k] += v.double() * n
            total += n
        global_sd = {k: (v / total).to(global_sd[k].dtype) for k, v in acc.items()}
    return time.perf_counter() - t0


def engine_run(cfg: ExperimentConfig) -> float:
    """Seconds for the same workload through the engine (Ray already started)."""
    from cafe_ray.sim.engine import run_simulation

    t0 = time.perf_counter()
    run_simulation(cfg, show_progress=False, console=_quiet())
    return time.perf_counter() - t0


def _quiet():  # noqa: ANN202
    from rich.console import Console

    return Console(quiet=True)


def measure(label: str, cfg: ExperimentConfig) -> OverheadResult:
    bare = bare_loop(cfg)
    eng = engine_run(cfg)
    return OverheadResult(label, cfg.data.num_clients * cfg.round.num_rounds, bare, eng)
