"""Which thresholds should the latency-SLO controller walk: each client's own, or one pooled ladder?

Validation only (the test split is never read). For each of ``--splits`` random halvings of
every client's ``val`` split: build each client's SLO curve on half A, as the server builds it
(``client``: the client's own front of the threshold grid, :func:`threshold_curve`; ``pooled``:
the ladder from all clients' half-A scores pooled, :func:`pooled_ladder` + :func:`ladder_curve`,
each client's floor applied), put every client on rung k of its curve (its last rung where it
has fewer), and score that on half B: the MACs and accuracy of all clients' half-B samples
together, against the accuracy one fixed threshold gives at the same MACs on half B (the grid's
accuracy-vs-MACs curve on half B, interpolated). The gap is what the choice of thresholds costs
at equal compute, with the noise of a ~250-sample split in it.

    .venv/bin/python benchmarks/slo_ladder_check.py RUN_DIR [--drop 1] [--splits 20]

Results and the run they were measured on: docs/serving.md, "Which thresholds".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.service import ModelService
from cafe_ray.serve.slo import (
    DEFAULT_GRID,
    curve_point,
    ladder_curve,
    pooled_ladder,
    threshold_curve,
)

Scores = tuple[np.ndarray, np.ndarray]


def _pooled_point(halves: dict[int, Scores], cascade: list[int], threshold: float | None) -> tuple[float, float]:
    pts = [curve_point(*s, cascade, threshold) for s in halves.values()]
    n = [len(s[0]) for s in halves.values()]
    return float(np.average([p.macs for p in pts], weights=n)), float(np.average([p.accuracy for p in pts], weights=n))


def _curves(mode: str, a: dict[int, Scores], cascade: list[int], drop: float) -> dict[int, list]:
    if mode == "client":
        return {c: threshold_curve(*s, cascade, max_accuracy_drop=drop) for c, s in a.items()}
    ladder = pooled_ladder(list(a.values()), cascade, max_accuracy_drop=drop)
    return {c: ladder_curve(*s, cascade, ladder, drop) for c, s in a.items()}


def check(run_dir: Path, drop: float, splits: int, rungs: int = 12) -> dict[str, np.ndarray]:
    """``{mode: (splits, rungs, 3)}`` arrays of (MACs, accuracy, accuracy - fixed threshold's)."""
    svc = ModelService(ServeConfig(run_dir=str(run_dir)))
    cascade = [int(c) for c in svc.cost.cascade]
    scores = {c: svc.val_scores(c, svc.load_model(c)) for c in svc.client_ids}
    out: dict[str, list] = {"client": [], "pooled": []}
    for seed in range(splits):
        rng = np.random.default_rng(seed)
        a: dict[int, Scores] = {}
        b: dict[int, Scores] = {}
        for c, (mp, ok) in scores.items():
            idx = rng.permutation(len(mp))
            half = len(mp) // 2
            a[c], b[c] = (mp[idx[:half]], ok[idx[:half]]), (mp[idx[half:]], ok[idx[half:]])
        ref = sorted(_pooled_point(b, cascade, t) for t in (None, *DEFAULT_GRID))
        xs, ys = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
        for mode in out:
            curves = _curves(mode, a, cascade, drop)
            rows = []
            for k in range(rungs):
                chosen = {c: pts[min(k, len(pts) - 1)].threshold for c, pts in curves.items()}
                pts = [curve_point(*b[c], cascade, chosen[c]) for c in b]
                n = [len(b[c][0]) for c in b]
                macs = float(np.average([p.macs for p in pts], weights=n))
                acc = float(np.average([p.accuracy for p in pts], weights=n))
                rows.append((macs, acc, acc - float(np.interp(macs, xs, ys))))
            out[mode].append(rows)
    return {m: np.array(v) for m, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--drop", type=float, default=1.0, help="accuracy floor, val points below full depth")
    ap.add_argument("--splits", type=int, default=20, help="random halvings of the val splits")
    args = ap.parse_args()
    res = check(args.run_dir, args.drop / 100, args.splits)
    print(f"{args.run_dir}: floor {args.drop:g} points, {args.splits} halvings of val (curves on one half, "
          "scored on the other)")
    print("| thresholds | gap to one fixed threshold at equal MACs, mean over rungs (points) | "
          "rung 1 | rung 3 | rung 6 | rung 11 |")
    print("|---|---|---|---|---|---|")
    for mode, arr in res.items():
        cells = [f"{arr[:, k, 0].mean() / 1e6:.2f}M / {100 * arr[:, k, 1].mean():.2f}% / {100 * arr[:, k, 2].mean():+.2f}"
                 for k in (1, 3, 6, 11)]
        print(f"| {mode} | {100 * arr[:, 1:, 2].mean():+.3f} (median {100 * np.median(arr[:, 1:, 2]):+.3f}) | "
              + " | ".join(cells) + " |")
    print("(rung cells: MACs / accuracy / gap, on the held-out half; rung 0 is full depth)")


if __name__ == "__main__":
    main()
