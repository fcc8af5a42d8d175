"""Start-up: from the command to the end of the first round, and what ``ray.init`` takes of it.

Each run is a fresh ``cafe-ray`` process doing what ``cafe-ray simulate CONFIG`` does,
in the same order and through the same functions: import the CLI, load the config,
preflight (which loads and partitions the data), start a local Ray, then
``run_simulation`` (coordinator, client actors, round 0). It records the wall
clock at each step and when round 0's line lands in ``metrics.jsonl``, so the
numbers include interpreter start, every import and the preflight, and the time
beyond ``ray.init`` is the total minus the ``ray.init`` call itself.

One probe is ``cafe-ray bench startup-probe CONFIG OUT`` (one JSON line on stdout: the
command's own entry point, so the CLI's import is timed as users pay it); ``cafe-ray bench
startup`` runs several and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StartupResult:
    import_s: float  # interpreter start + import cafe_ray.cli
    preflight_s: float  # load the config, preflight (data loaded and partitioned, model built)
    ray_init_s: float  # ensure_ray(None): import ray + ray.init
    to_first_round_s: float  # after ray.init: coordinator, client actors, data, round 0
    load: float
    preload: bool = True  # the local Ray's workers preloaded the engine (as `simulate` has them)

    @property
    def total_s(self) -> float:
        return self.import_s + self.preflight_s + self.ray_init_s + self.to_first_round_s

    @property
    def beyond_ray_init_s(self) -> float:
        return self.total_s - self.ray_init_s


def _first_round_watch(folder: Path, stamp: dict[str, float], stop: threading.Event) -> None:
    """Record when the first line of ``<folder>/*/metrics.jsonl`` (round 0) appears."""
    while not stop.is_set():
        for f in folder.glob("*/metrics.jsonl"):
            if f.stat().st_size > 0:
                stamp["first_round"] = time.time()
                return
        time.sleep(0.01)


def probe(config: str, out: str, preload: bool = True) -> dict[str, float]:
    """One ``cafe-ray simulate`` start-up, step by step, in a ``cafe-ray`` process that has just
    imported its CLI (``cafe-ray bench startup-probe``)."""
    t_config = time.time()
    from rich.console import Console

    from cafe_ray.config import load_config
    from cafe_ray.sim.preflight import preflight  # the CLI's order: preflight, then the engine

    cfg = load_config(Path(config), [f"output_dir={out}", "round.num_rounds=2"])
    report = preflight(cfg, keep_data=True, model_in_background=True)  # as `cafe-ray simulate` calls it
    from cafe_ray.sim import engine

    t_ray = time.time()
    engine.ensure_ray(None, preload=preload)
    t_run = time.time()
    stamp: dict[str, float] = {}
    stop = threading.Event()
    watch = threading.Thread(target=_first_round_watch, args=(Path(out), stamp, stop), daemon=True)
    watch.start()
    try:
        engine.run_simulation(cfg, show_progress=False, console=Console(quiet=True), checked=report)
    finally:
        stop.set()
        watch.join()
        engine.shutdown_ray_if_started()
    return {"import_end": t_config, "preflight_end": t_ray, "ray_init_end": t_run,
            "first_round": stamp.get("first_round", float("nan"))}


def measure_startup(config: Path, out: str, preload: bool = True) -> StartupResult:
    """Launch one probe in a fresh interpreter; the clock starts at the launch.

    ``preload=False``: the local Ray's workers do not preload the engine, unlike
    ``cafe-ray simulate`` (``ensure_ray(preload=True)``), to show what that buys.
    """
    from cafe_ray.bench.overhead import load_avg

    folder = Path(out) / f"startup-{time.time_ns()}"  # this probe's run directory only
    load = load_avg()
    launch = time.time()
    proc = subprocess.run([sys.executable, "-m", "cafe_ray.cli", "bench", "startup-probe", str(config), str(folder),
                           "--preload" if preload else "--no-preload"],
                          check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"start-up probe printed no result; stderr:\n{proc.stderr[-2000:]}")
    st = json.loads(lines[-1])
    return StartupResult(
        import_s=st["import_end"] - launch, preflight_s=st["preflight_end"] - st["import_end"],
        ray_init_s=st["ray_init_end"] - st["preflight_end"], to_first_round_s=st["first_round"] - st["ray_init_end"],
        load=load, preload=preload)

