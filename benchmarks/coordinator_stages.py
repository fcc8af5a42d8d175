"""Where a steady tiny round's time goes on the coordinator: per-stage wall time.

Runs the `bench overhead` tiny workload (synthetic 8x8, 50 clients per round, 1 local
step, 2 client actors) with the round loop in this process (the Ray executor, as inside
the coordinator actor) and times each stage of every round. "outside ray.wait" is the
coordinator's own serial work: the actors idle through it. Compare two versions of the
code by putting one on PYTHONPATH (run from outside the repository, so that the working
folder does not shadow it):

    cd /tmp && python /path/to/benchmarks/coordinator_stages.py 40
    cd /tmp && PYTHONPATH=/path/to/other/checkout python /path/to/benchmarks/coordinator_stages.py 40
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time

import ray
import torch

import cafe_ray.sim.executor as executor
import cafe_ray.sim.simulation as simulation
from cafe_ray.bench import overhead
from cafe_ray.runs import rundir
from cafe_ray.sim.engine import ensure_ray, run_here


def main(rounds: int) -> None:
    ensure_ray(None)
    torch.set_num_threads(1)
    stages: dict[str, list[float]] = collections.defaultdict(list)
    now: dict[str, float] = {}

    def timed(owner: object, name: str, key: str) -> None:
        f = getattr(owner, name)

        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                now[key] = now.get(key, 0.0) + time.perf_counter() - t
        setattr(owner, name, g)

    timed(executor, "unpack_results", "unpack")
    timed(rundir, "append_jsonl", "log writes")
    timed(ray, "wait", "ray.wait")
    plain_round = simulation.Simulation._round

    def round_(self, t):
        if not getattr(self, "_timed", False):
            self._timed = True
            timed(self.algorithm, "server_payloads", "payloads")
            timed(self.executor, "run_fit", "run_fit (dispatch + wait)")
            timed(self.store, "commit", "state commits")
            timed(self.algorithm, "aggregate", "aggregate")
        now.clear()
        t0 = time.perf_counter()
        rec = plain_round(self, t)
        now["round"] = time.perf_counter() - t0
        now["outside ray.wait"] = now["round"] - now.get("ray.wait", 0.0)
        for k, v in now.items():
            stages[k].append(v)
        return rec

    simulation.Simulation._round = round_
    cfg = overhead.workload("synthetic", 50, rounds, 1, 1, 8, None, tempfile.mkdtemp())
    run_here(cfg, rundir.new_run_dir(cfg))
    steady = slice(2, rounds - 1)  # no actor start-up, no final evaluation
    print(f"load {os.getloadavg()[0]:.2f}; {rounds - 3} steady rounds; ms per round, median / min")
    for k, xs in stages.items():
        xs = xs[steady]
        print(f"  {k:28s} {1000 * statistics.median(xs):8.2f} / {1000 * min(xs):8.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
