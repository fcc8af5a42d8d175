"""Memory versus registered clients: peak RSS of driver + coordinator + client actors.

Clients are data (a profile and a state file), so 1000 registered clients with
50 per round must need no more memory than 100 with 50 per round.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil

from cafe_ray.config import build_config


@dataclass(frozen=True)
class MemoryResult:
    registered: int
    per_round: int
    peak_rss_mb: float
    store_mb: float


class PeakRSS:
    """Samples every 100 ms the RSS of this process and all its descendants.

    ``ray.init()`` here starts the local cluster as children of this driver, so the
    tree holds the raylet, GCS, the coordinator and every client actor, and nothing
    of other Ray instances on the same machine.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process(os.getpid())
        total = me.memory_info().rss
        for p in me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(registered: int, per_round: int, rounds: int, out: str) -> MemoryResult:
    from rich.console import Console

    from cafe_ray.sim.engine import run_simulation

    cfg = build_config({
        "name": f"mem-{registered}", "output_dir": out,
        "data": {"name": "synthetic", "num_clients": registered, "synthetic_samples": 20_000,  # fixed: only the number of clients varies
                 "synthetic_shape": [1, 8, 8], "partition": {"kind": "iid"}},
        "model": {"name": "cnn_small", "width": 16},
        "algorithm": {"name": "fedper_ee"},  # personal heads: one state file per client
        "train": {"local_epochs": 1, "batch_size": 20},
        "round": {"num_rounds": rounds, "fraction": per_round / registered, "eval_every": rounds,
                  "eval_clients": "participants"},
        "profiles": {"catalog": "uniform", "actors_per_class": 2},
        "checkpoint": {"every": rounds, "keep": 1},
    })
    with PeakRSS() as mon:
        run_dir, _ = run_simulation(cfg, show_progress=False, console=Console(quiet=True))
    store = sum(p.stat().st_size for p in (run_dir / "store").glob("*.safetensors"))
    return MemoryResult(registered, per_round, mon.peak / 2**20, store / 2**20)
