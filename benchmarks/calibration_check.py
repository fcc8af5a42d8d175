"""Does a validation-calibrated exit threshold keep its promise on test?

For each run directory: sweep every client's thresholds on ``val`` and on ``test``, choose the
cheapest threshold within 1 point of full depth on ``val`` (the point estimate, then with a
one-sided bound on the paired accuracy drop at each confidence), and read it on ``test``.
Prints one line per run and a summary: how often the test drop exceeds the point (a miss),
the mean and worst drop, and the mean MACs reduction each rule keeps.

    .venv/bin/python benchmarks/calibration_check.py RUN_DIR [RUN_DIR ...] [--confidence 0.8 0.9]

Results and the runs it was measured on: docs/inference.md, "A calibration that keeps its
promise".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cafe_ray.inference.evaluate import (
    TOLERANCE,
    calibrated_saving,
    pool_curves,
    sweep,
    threshold_grid,
)
from cafe_ray.runs import RunArtifacts


def check(run_dir: Path, confidences: list[float | None]) -> list[tuple[float | None, float | None, float, float]]:
    """(confidence, threshold, test accuracy delta, test MACs reduction) per rule."""
    art = RunArtifacts(run_dir)
    cost, grid = art.exit_cost, threshold_grid()
    full_macs = int(cost.cumulative[-1])
    val, test = [], []
    for cid in art.client_ids:
        model = art.client_model(cid)
        for split, out in (("val", val), ("test", test)):
            x, y = art.client_data(cid, split)
            if x.shape[0]:
                out.append(sweep(model, x, y, cost, grid))
    v, t = pool_curves(val), pool_curves(test)
    rows = []
    for conf in confidences:
        s = calibrated_saving(v, t, full_macs, confidence=conf)
        rows.append((conf, s.threshold, s.delta_accuracy, s.reduction))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--confidence", nargs="*", type=float, default=[0.8, 0.9])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rules: list[float | None] = [None, *args.confidence]
    results = {c: [] for c in rules}
    for rd in args.run_dirs:
        rows = check(rd, rules)
        print(f"{rd}: " + "; ".join(f"{'point' if c is None else c}: t={t} {100 * d:+.2f} pt, {100 * r:.1f}% saved"
                                    for c, t, d, r in rows), flush=True)
        for c, _, d, r in rows:
            results[c].append((d, r))
    print("\n| rule on val | runs | test drop beyond 1 point | mean test delta | worst | mean MACs reduction |")
    print("|---|---|---|---|---|---|")
    for c, vals in results.items():
        d = np.array([x for x, _ in vals])
        r = np.array([y for _, y in vals])
        misses = int((d < -TOLERANCE - 1e-9).sum())
        name = "point estimate" if c is None else f"{100 * c:g}% one-sided bound"
        print(f"| {name} | {len(d)} | {misses} | {100 * d.mean():+.2f} | {100 * d.min():+.2f} | {100 * r.mean():.1f}% |")


if __name__ == "__main__":
    main()
