"""Does merging requests of one client model into one forward pass pay on this CPU?

Per-request model time (``predict_batch``, one torch thread) when ``serve.batch`` merges k
requests of 64 samples of one client: k = 1, 2, 4, 8, 16, full depth and a threshold, the order
of k alternating between 5 rounds; min and median per request, and the load average.

    python benchmarks/serve_batching.py RUN_DIR [THRESHOLD]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from cafe_ray.inference import FullDepth, Threshold, predict_batch
from cafe_ray.runs import RunArtifacts
from cafe_ray.serve.core import prepare_model


def main(run_dir: str, threshold: float = 0.75, rounds: int = 5, repeats: int = 3) -> None:
    torch.set_num_threads(1)
    run = RunArtifacts(run_dir)
    cid = run.client_ids[0]
    x, _ = run.client_data(cid, "holdout")
    model, cost = prepare_model(run.client_model(cid)), run.exit_cost
    g = torch.Generator().manual_seed(0)
    res: dict[tuple[str, int], list[float]] = {}
    load = os.getloadavg()
    for r in range(rounds):
        for k in (1, 2, 4, 8, 16) if r % 2 == 0 else (16, 8, 4, 2, 1):
            xb = x[torch.randint(0, x.shape[0], (64 * k,), generator=g)]
            for name, pol in (("full", FullDepth()), (f"threshold {threshold}", Threshold(threshold))):
                predict_batch(model, xb, pol, cost)
                t = time.perf_counter()
                for _ in range(repeats):
                    predict_batch(model, xb, pol, cost)
                res.setdefault((name, k), []).append((time.perf_counter() - t) / repeats / k * 1e3)
    print("| policy | requests merged (64 samples each) | ms per request: min | median |\n|---|---|---|---|")
    for (name, k), v in sorted(res.items()):
        print(f"| {name} | {k} | {min(v):.2f} | {np.median(v):.2f} |")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load)}; after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
