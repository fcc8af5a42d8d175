"""Scale: round time flat in registered clients (start-up is :mod:`cafe_ray.bench.startup`).

The same data (synthetic, fixed size), the same 100 clients per round
and the same per-client work (1 local step of batch 2), with 1,000 versus
1,000,000 registered clients. The steady round time (median over the rounds
that neither start the actors nor evaluate) must not grow with the registered
clients; peak memory should grow only with what scales with N (splits, profiles).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cafe_ray.config import ExperimentConfig, build_config


@dataclass(frozen=True)
class ScaleResult:
    registered: int
    per_round: int
    setup_s: float  # run_simulation wall minus the rounds: coordinator, actors, data, splits, files
    steady_round_s: float  # median round wall time, rounds 1 .. T-2
    round_times: tuple[float, ...]
    peak_rss_mb: float
    load: float
    round_cpu_s: tuple[float | None, ...] = ()  # CPU s of the run's processes per round (None: not seen)

    @property
    def steady_cpu_s(self) -> float | None:
        """Median CPU seconds per steady round (rounds 1 .. T-2), None when none was seen."""
        cpu = [c for c in self.round_cpu_s[1:-1] if c is not None]
        return statistics.median(cpu) if cpu else None


class RoundCPU:
    """CPU seconds (user + system) this process's descendants spend in each round.

    Watches ``<folder>/*/metrics.jsonl`` (one line per finished round) every 20 ms;
    when a round ends it reads the CPU times of every descendant of this process
    (``ray.init()`` here makes the local cluster its children: raylet, GCS,
    coordinator, client actors). Round t's CPU is the difference between the
    snapshots at the ends of rounds t-1 and t, over the processes alive at both.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.snapshots: dict[int, dict[int, float]] = {}  # rounds done -> {pid: cpu s}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _cpu() -> dict[int, float]:
        import os

        import psutil

        out: dict[int, float] = {}
        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _rounds_done(self) -> int:
        files = list(self.folder.glob("*/metrics.jsonl"))
        if not files:
            return 0
        with open(files[0], "rb") as f:
            return f.read().count(b"\n")

    def _loop(self) -> None:
        seen = 0
        while not self._stop.is_set():
            n = self._rounds_done()
            if n != seen:
                self.snapshots[n] = self._cpu()
                seen = n
            time.sleep(0.02)

    def per_round(self, rounds: int) -> tuple[float | None, ...]:
        out: list[float | None] = []
        for t in range(rounds):
            a, b = self.snapshots.get(t), self.snapshots.get(t + 1)
            out.append(None if a is None or b is None else sum(b[p] - a[p] for p in b.keys() & a.keys()))
        return tuple(out)

    def __enter__(self) -> RoundCPU:
        self.snapshots[0] = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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

    folder = Path(out) / f"scale-{registered}-{uuid.uuid4().hex[:8]}"  # this run's directory only
    cfg = scale_config(registered, per_round, rounds, str(folder), samples)
    load = load_avg()
    t0 = time.perf_counter()
    with PeakRSS() as mon, RoundCPU(folder) as cpu:
        run_dir, summary = run_simulation(cfg, show_progress=False, console=Console(quiet=True))
    e2e = time.perf_counter() - t0
    walls = tuple(float(r["wall_s"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS))
    steady = statistics.median(walls[1:-1]) if len(walls) > 2 else walls[-1]
    return ScaleResult(registered, per_round, e2e - sum(walls), steady, walls, mon.peak / 2**20, load,
                       cpu.per_round(len(walls)))
