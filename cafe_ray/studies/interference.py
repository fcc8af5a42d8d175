"""Depth-wise interference over training, read back from runs made with ``measure_interference``.

Each client records ``grad_cos_k_l`` (cafe_ray.algorithms.interference) before its local
training in every round it takes part in; this module summarises those cosines per
exit pair over the phases of training and across runs (e.g. seeds, settings, models),
so that one can see whether the exits conflict and where the conflict grows.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cafe_ray.runs import rundir

PAIR = re.compile(r"^grad_cos_(\d+)_(\d+)$")


def read_cosines(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """pair name ('0-1') -> [(round, cosine)] over every client record of the run."""
    recs = rundir.read_jsonl(Path(run_dir) / rundir.CLIENTS)
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in recs:
        for key, value in r.items():
            m = PAIR.match(key)
            if m and value is not None and math.isfinite(float(value)):
                out[f"{m.group(1)}-{m.group(2)}"].append((int(r["round"]), float(value)))
    if not out:
        raise ValueError(f"{run_dir}: no grad_cos_* in {rundir.CLIENTS}; run it with "
                         "--set algorithm.cafedistill.measure_interference=true")
    return dict(out)


def summarise(run_dirs: list[Path], phases: int = 3) -> list[dict[str, Any]]:
    """One row per (exit pair, phase of training): mean, std, share of negative cosines, count.

    Phases split the rounds 0..T-1 of every run into ``phases`` equal parts (first,
    middle, last third by default), pooled over the runs.
    """
    pooled: dict[tuple[str, int], list[float]] = defaultdict(list)
    for d in run_dirs:
        cos = read_cosines(d)
        T = max(rd for pts in cos.values() for rd, _ in pts) + 1
        for pair, pts in cos.items():
            for rd, c in pts:
                pooled[(pair, min(phases - 1, rd * phases // T))].append(c)
    rows = []
    for (pair, phase), xs in sorted(pooled.items()):
        a = np.asarray(xs)
        rows.append({"pair": pair, "phase": phase + 1, "phases": phases, "mean": float(a.mean()),
                     "std": float(a.std()), "negative": float((a < 0).mean()), "n": int(a.size)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| exits | phase of training | mean cosine | std | share < 0 | client-rounds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['phase']}/{r['phases']} | {r['mean']:+.3f} | {r['std']:.3f} | "
                     f"{r['negative']:.0%} | {r['n']} |")
    return "\n".join(lines)


def plot(run_dirs: list[Path], out: Path) -> Path:
    """Mean cosine per exit pair against the round (pooled over runs and clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_round: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in run_dirs:
        for pair, pts in read_cosines(d).items():
            for rd, c in pts:
                by_round[pair][rd].append(c)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for pair, rounds in sorted(by_round.items()):
        xs = sorted(rounds)
        ax.plot(xs, [float(np.mean(rounds[x])) for x in xs], label=f"exits {pair}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("cosine of the exits' gradients\non the stages they share")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
