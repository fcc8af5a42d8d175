"""Scale and start-up: round time flat in registered clients, and time to the first round.

``scale``: the same data (synthetic, fixed size), the same 100 clients per round
and the same per-client work (1 local step of batch 2), with 1,000 versus
1,000,000 registered clients. The steady round time (median over the rounds
that neither start the actors nor evaluate) must not grow with the registered
clients; peak memory should grow only with what scales with N (splits, profiles).

``startup``: the quickstart from the command to the end of its first round,
beyond ``ray.init``: a fresh interpreter importing the CLI, plus coordinator and
actor start, data loading and round 0, polled every 20 ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cafe_ray.config import ExperimentConfig, build_config, load_config


@dataclass(frozen=True)
class ScaleResult:
    registered: int
    per_round: int
    setup_s: float  # run_simulation wall minus the rounds: coordinator, actors, data, splits, files
    steady_round_s: float  # median round wall time, rounds 1 .. T-2
    round_times: tuple[float, ...]
    peak_rss_mb: float
    load: float


def scale_config(registered: int, per_round: int, rounds: int, out: str, samples: int = 2_000_000) -> ExperimentConfig:
    return build_config({
        "name": f"scale-{registered}", "seed": 0, "output_dir": out,
        "data": {"name": "synthetic", "num_clients": registered, "synthetic_samples": samples,
                 "synthetic_shape": [1, 8, 8], "partition": {"kind": "iid"}},
        "model": {"name": "cnn_small", "width": 8},
        "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": 1, "batch_size": 2, "max_steps": 1},
        "round": {"num_rounds": rounds, "fraction": per_round / registered, "eval_every": 10_000},
        "profiles": {"catalog": "uniform", "actors_per_class": 2},
        "checkpoint": {"every": 10_000, "keep": 1},
    })


def measure_scale(registered: int, per_round: int, rounds: int, out: str, samples: int) -> ScaleResult:
    from rich.console import Console

    from cafe_ray.bench.memory import PeakRSS
    from cafe_ray.bench.overhead import load_avg
    from cafe_ray.runs import rundir
    from cafe_ray.sim.engine import run_simulation

    cfg = scale_config(registered, per_round, rounds, out, samples)
    load = load_avg()
    t0 = time.perf_counter()
    with PeakRSS() as mon:
        run_dir, summary = run_simulation(cfg, show_progress=False, console=Console(quiet=True))
    e2e = time.perf_counter() - t0
    walls = tuple(float(r["wall_s"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS))
    steady = statistics.median(walls[1:-1]) if len(walls) > 2 else walls[-1]
    return ScaleResult(registered, per_round, e2e - sum(walls), steady, walls, mon.peak / 2**20, load)


@dataclass(frozen=True)
class StartupResult:
    import_s: float  # fresh interpreter: python -c "import cafe_ray.cli"
    to_first_round_s: float  # prepare run dir, start coordinator + actors, load data, round 0
    load: float

    @property
    def total_s(self) -> float:
        return self.import_s + self.to_first_round_s


def measure_startup(config: Path, out: str) -> StartupResult:
    import ray

    from cafe_ray.bench.overhead import load_avg
    from cafe_ray.sim.engine import prepare_run, start

    load = load_avg()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cafe_ray.cli"], check=True)
    import_s = time.perf_counter() - t
    cfg = load_config(config, [f"output_dir={out}", "round.num_rounds=2"])
    t0 = time.perf_counter()
    cfg, run_dir, resume = prepare_run(cfg, None)
    actor, fut = start(cfg, run_dir, resume)
    while ray.get(actor.progress.remote())["round"] < 1:
        time.sleep(0.02)
    first = time.perf_counter() - t0
    ray.get(fut)
    ray.kill(actor)
    return StartupResult(import_s, first, load)
