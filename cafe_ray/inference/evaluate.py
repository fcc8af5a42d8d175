"""Accuracy versus MACs: sweep exit thresholds over a run's clients and report the savings.

Every point is measured, not simulated: each sample runs only to the exit its policy takes
(:func:`~cafe_ray.inference.predict_batch`), and its MACs are counted exactly (every stage
and exit head it ran: the cascade cost). Per client, then aggregated over clients weighted
by split size (the pooled accuracy and mean MACs).

Inference cost reduction (CAFEDistill, arXiv:2601.10015, "What to report") is
``1 - mean MACs / full-depth MACs``, where full-depth MACs are a plain forward pass of
every stage plus the last head (``ExitCost.cumulative[-1]``: no intermediate heads), so the
reduction is net of the early exits' own overhead. It is reported at the cheapest sweep point
whose accuracy is within 1 point of full depth, and at threshold 0.6. The cheapest point is
an oracle when read off the evaluated split itself; ``calibrate_on="val"`` also picks that
threshold on the validation split and reports what it gives on the evaluated split (the
deployable number). ``calibrate_confidence`` makes that choice conservative: a threshold
qualifies only if a one-sided bound on its paired per-sample accuracy drop (normal
approximation, at that confidence) stays within the point, so a small validation split does
not promise what the test split will not keep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from rich.table import Table

from cafe_ray.inference.dynamic import predict_batch
from cafe_ray.inference.policies import ExitPolicy, FullDepth, Threshold
from cafe_ray.inference.tables import markdown_rows, rich_rows
from cafe_ray.models import EarlyExitNet, ExitCost
from cafe_ray.runs import RunArtifacts

REFERENCE_THRESHOLD = 0.6  # the paper's operating point
TOLERANCE = 0.01  # "within 1 accuracy point of full depth"
DEFAULT_STEPS = 21  # thresholds 0, 0.05, ..., 1


# ------------------------------------------------------------------ one policy
@dataclass(frozen=True)
class PolicyResult:
    """One policy on one set of samples."""

    accuracy: float
    mean_macs: float  # exact mean over samples of the cascade MACs each one ran
    n: int
    exit_counts: tuple[int, ...]  # samples that left at each exit

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_counts": list(self.exit_counts)}


def evaluate_policy(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, policy: ExitPolicy, cost: ExitCost,
                    batch_size: int = 1024) -> PolicyResult:
    """Accuracy, exact mean MACs and exit histogram of ``policy`` on (x, y)."""
    return _run_policy(model, x, y, policy, cost, batch_size)[0]


def _run_policy(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, policy: ExitPolicy, cost: ExitCost,
                batch_size: int = 1024) -> tuple[PolicyResult, np.ndarray]:
    """:func:`evaluate_policy` and whether each sample was right (for paired comparisons)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on 0 samples")
    right, macs, counts = [], 0, np.zeros(model.num_exits, dtype=np.int64)
    for i in range(0, x.shape[0], batch_size):
        p = predict_batch(model, x[i : i + batch_size], policy, cost)
        right.append((p.labels == y[i : i + batch_size]).numpy())
        macs += int(p.macs.sum())
        counts += np.bincount(p.exits.numpy(), minlength=model.num_exits)
    n = int(x.shape[0])
    correct = np.concatenate(right)
    return PolicyResult(int(correct.sum()) / n, macs / n, n, tuple(int(c) for c in counts)), correct


def pooled(results: Sequence[PolicyResult]) -> PolicyResult:
    """Aggregate over clients weighted by their sample counts."""
    n = sum(r.n for r in results)
    if n == 0:
        raise ValueError("pooled: no samples")
    counts = np.sum([r.exit_counts for r in results], axis=0)
    return PolicyResult(sum(r.accuracy * r.n for r in results) / n, sum(r.mean_macs * r.n for r in results) / n,
                        n, tuple(int(c) for c in counts))


# ------------------------------------------------------------------ the sweep
@dataclass(frozen=True)
class CurvePoint:
    threshold: float | None  # None: full depth (no early exit)
    result: PolicyResult
    # per sample, right or not (same sample order at every point of a curve): paired bounds
    correct: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return "full" if self.threshold is None else f"t={self.threshold:.2f}"


def threshold_grid(steps: int = DEFAULT_STEPS) -> list[float]:
    """``steps`` evenly spaced thresholds in [0, 1] (exact decimals), always including 0.6."""
    if steps < 2:
        raise ValueError(f"a threshold sweep needs at least 2 steps, got {steps}")
    grid = {round(i / (steps - 1), 10) for i in range(steps)} | {REFERENCE_THRESHOLD}
    return sorted(grid)


def sweep(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, cost: ExitCost,
          thresholds: Sequence[float]) -> list[CurvePoint]:
    """One point per threshold, then the full-depth point last."""
    return [CurvePoint(t, *_run_policy(model, x, y, Threshold(t) if t is not None else FullDepth(), cost))
            for t in [*thresholds, None]]


def pool_curves(curves: Sequence[Sequence[CurvePoint]]) -> list[CurvePoint]:
    """Point-wise pooled curve of several clients swept on the same thresholds."""
    out = []
    for pts in zip(*curves, strict=True):
        if len({p.threshold for p in pts}) != 1:
            raise ValueError("pool_curves: clients were swept on different thresholds")
        correct = (np.concatenate([p.correct for p in pts]) if all(p.correct is not None for p in pts)
                   else None)
        out.append(CurvePoint(pts[0].threshold, pooled([p.result for p in pts]), correct))
    return out


@dataclass(frozen=True)
class Saving:
    """One operating point and its inference cost reduction."""

    threshold: float | None
    accuracy: float
    mean_macs: float
    reduction: float  # 1 - mean_macs / full-depth MACs
    delta_accuracy: float  # accuracy - full-depth accuracy


def accuracy_drop_bound(full_correct: np.ndarray, correct: np.ndarray, confidence: float) -> float:
    """One-sided upper bound, at ``confidence``, on the accuracy lost against full depth.

    Paired over the same samples: d_i = right at full depth - right here, bound =
    mean(d) + z * sd(d) / sqrt(n) (normal approximation). Samples both get right, or both
    wrong, add nothing to sd: what counts is how many answers the early exits change.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if full_correct.shape != correct.shape or full_correct.size == 0:
        raise ValueError("accuracy_drop_bound: the two need the same, non-empty samples")
    d = full_correct.astype(float) - correct.astype(float)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return float(d.mean()) + NormalDist().inv_cdf(confidence) * sd / math.sqrt(d.size)


def savings(points: Sequence[CurvePoint], full_macs: int, tolerance: float = TOLERANCE,
            at: float = REFERENCE_THRESHOLD, confidence: float | None = None) -> dict[str, Saving]:
    """``within_1pt``: the cheapest point with accuracy >= full depth - tolerance; ``at_0.6``.

    ``confidence``: a point qualifies only if :func:`accuracy_drop_bound` at that confidence
    is within ``tolerance`` (needs the points' per-sample ``correct``).
    """
    full = next((p for p in points if p.threshold is None), None)
    if full is None:
        raise ValueError("savings: the curve has no full-depth point (threshold None)")
    if confidence is not None and any(p.correct is None for p in points):
        raise ValueError("savings: a confidence bound needs every point's per-sample results (sweep keeps them)")

    def saving(p: CurvePoint) -> Saving:
        r = p.result
        return Saving(p.threshold, r.accuracy, r.mean_macs, 1.0 - r.mean_macs / full_macs,
                      r.accuracy - full.result.accuracy)

    ok = [p for p in points if p.result.accuracy >= full.result.accuracy - tolerance - 1e-12
          and (confidence is None or p.threshold is None
               or accuracy_drop_bound(full.correct, p.correct, confidence) <= tolerance + 1e-12)]
    best = min(ok, key=lambda p: (p.result.mean_macs, -p.result.accuracy))
    out = {"within_1pt": saving(best)}
    ref = next((p for p in points if p.threshold is not None and abs(p.threshold - at) < 1e-9), None)
    if ref is not None:
        out[f"at_{at:g}"] = saving(ref)
    return out


# ------------------------------------------------------------------ one run
@dataclass
class ClientCurve:
    client_id: int
    points: list[CurvePoint]
    savings: dict[str, Saving]

    @property
    def n(self) -> int:
        return self.points[0].result.n


@dataclass
class RunEvaluation:
    """A run's accuracy-vs-MACs curves on one split, per client and pooled."""

    run_dir: str
    algorithm: str
    split: str
    exit_cascade: list[int]  # MACs to reach each exit, every head on the way evaluated
    full_macs: int  # every stage + last head: the denominator of the cost reduction
    clients: list[ClientCurve]
    points: list[CurvePoint]  # pooled over clients
    savings: dict[str, Saving]
    label: str = field(default="")
    calibrate_confidence: float | None = None  # the bound the calibrated point was chosen with

    @property
    def full(self) -> PolicyResult:
        return next(p.result for p in self.points if p.threshold is None)

    def to_json(self) -> dict[str, Any]:
        def pts(ps: list[CurvePoint]) -> list[dict]:
            return [{"threshold": p.threshold, **p.result.to_json()} for p in ps]

        return {
            "run_dir": self.run_dir, "algorithm": self.algorithm, "label": self.label, "split": self.split,
            "calibrate_confidence": self.calibrate_confidence,
            "exit_cascade_macs": self.exit_cascade, "full_depth_macs": self.full_macs,
            "aggregate": {"points": pts(self.points), "savings": {k: asdict(v) for k, v in self.savings.items()}},
            "clients": [{"client": c.client_id, "n": c.n, "points": pts(c.points),
                         "savings": {k: asdict(v) for k, v in c.savings.items()}} for c in self.clients],
        }


def calibration_is_disjoint(art: RunArtifacts, split: str, calibrate_on: str) -> bool:
    """Whether ``calibrate_on`` shares no sample with ``split`` for this run.

    With a validation split (data.val_fraction > 0) 'val' is carved from training data and
    disjoint from 'test' and 'holdout'; without one, 'val' is half of 'test'.
    """
    if calibrate_on == split:
        return False
    if calibrate_on == "val" and split in ("test", "holdout"):
        return art.cfg.data.val_fraction > 0 or split == "holdout"
    return False


def evaluate_run(run: str | Path | RunArtifacts, split: str = "test", steps: int = DEFAULT_STEPS,
                 clients: Sequence[int] | None = None, calibrate_on: str | None = None,
                 calibrate_confidence: float | None = None) -> RunEvaluation:
    """Sweep ``threshold_grid(steps)`` + full depth for every client (or ``clients``) on ``split``.

    ``calibrate_on`` (e.g. "val"): also choose the <=1-point threshold on that split and
    report it on ``split`` as ``savings["calibrated_1pt"]``; refused when the two overlap.
    ``calibrate_confidence`` (e.g. 0.9): choose it with a one-sided bound on the accuracy
    drop instead of the point estimate (:func:`savings`).
    """
    if calibrate_confidence is not None and not 0 < calibrate_confidence < 1:
        raise ValueError(f"calibrate_confidence must be in (0, 1), got {calibrate_confidence}")
    art = run if isinstance(run, RunArtifacts) else RunArtifacts(run)
    if calibrate_on is not None and not calibration_is_disjoint(art, split, calibrate_on):
        raise ValueError(f"{art.run_dir}: cannot calibrate on {calibrate_on!r} and report on {split!r}: they "
                         "overlap (without data.val_fraction > 0, 'val' is half of the test split; "
                         "report on 'holdout' then)")
    cost = art.exit_cost
    full_macs = int(cost.cumulative[-1])
    grid = threshold_grid(steps)
    curves, calib = [], []
    for cid in (art.client_ids if clients is None else list(clients)):
        x, y = art.client_data(cid, split)
        if x.shape[0] == 0:
            continue  # a client with no samples in this split carries no weight
        model = art.client_model(cid)
        pts = sweep(model, x, y, cost, grid)
        curves.append(ClientCurve(cid, pts, savings(pts, full_macs)))
        if calibrate_on is not None:
            xv, yv = art.client_data(cid, calibrate_on)
            if xv.shape[0]:
                calib.append(sweep(model, xv, yv, cost, grid))
    if not curves:
        raise ValueError(f"{art.run_dir}: no client has samples in split {split!r}")
    agg = pool_curves([c.points for c in curves])
    sav = savings(agg, full_macs)
    if calib:
        sav["calibrated_1pt"] = calibrated_saving(pool_curves(calib), agg, full_macs,
                                                  confidence=calibrate_confidence)
    return RunEvaluation(str(art.run_dir), art.cfg.algorithm.name, split, [int(v) for v in cost.cascade],
                         full_macs, curves, agg, sav,
                         calibrate_confidence=calibrate_confidence if calib else None)


def calibrated_saving(calibration: Sequence[CurvePoint], evaluated: Sequence[CurvePoint], full_macs: int,
                      tolerance: float = TOLERANCE, confidence: float | None = None) -> Saving:
    """The <=1-point threshold chosen on ``calibration`` (with a bound at ``confidence``, if
    given), read on ``evaluated`` (same grid)."""
    t = savings(calibration, full_macs, tolerance, confidence=confidence)["within_1pt"].threshold
    point = next(p for p in evaluated if p.threshold == t)
    full = next(p for p in evaluated if p.threshold is None).result
    r = point.result
    return Saving(t, r.accuracy, r.mean_macs, 1.0 - r.mean_macs / full_macs, r.accuracy - full.accuracy)


def label_runs(evals: Sequence[RunEvaluation]) -> None:
    """Label each run by its algorithm, adding the run folder's name where algorithms repeat."""
    names = [e.algorithm for e in evals]
    for e in evals:
        e.label = e.algorithm if names.count(e.algorithm) == 1 else f"{e.algorithm} ({Path(e.run_dir).name})"


# ------------------------------------------------------------------ reporting
_COLUMNS = ("run", "split", "clients", "full-depth acc", "full MACs", "<=1pt: thr", "<=1pt: acc",
            "<=1pt: MACs", "<=1pt: reduction", "val-calibrated: thr", "val-calibrated: acc (delta)",
            "val-calibrated: reduction", "t=0.6: acc (delta)", "t=0.6: MACs", "t=0.6: reduction")


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _thr(t: float | None) -> str:
    return "full" if t is None else f"{t:.2f}"


def table_rows(evals: Sequence[RunEvaluation]) -> list[list[str]]:
    rows = []
    for e in evals:
        w, r = e.savings["within_1pt"], e.savings.get(f"at_{REFERENCE_THRESHOLD:g}")
        c = e.savings.get("calibrated_1pt")
        rows.append([
            e.label or e.algorithm, e.split, str(len(e.clients)), _pct(e.full.accuracy), f"{e.full_macs:,}",
            _thr(w.threshold), _pct(w.accuracy), f"{w.mean_macs:,.0f}", _pct(w.reduction),
            _thr(c.threshold) if c else "-", f"{_pct(c.accuracy)} ({100 * c.delta_accuracy:+.2f})" if c else "-",
            _pct(c.reduction) if c else "-",
            f"{_pct(r.accuracy)} ({100 * r.delta_accuracy:+.2f})" if r else "-",
            f"{r.mean_macs:,.0f}" if r else "-", _pct(r.reduction) if r else "-",
        ])
    return rows


def rich_table(evals: Sequence[RunEvaluation]) -> Table:
    return rich_rows("dynamic inference: accuracy vs mean MACs per sample (pooled over clients)",
                     _COLUMNS, table_rows(evals), left=("run", "split"))


def markdown_table(evals: Sequence[RunEvaluation]) -> str:
    return "\n".join(markdown_rows(_COLUMNS, table_rows(evals)))


def markdown_report(evals: Sequence[RunEvaluation]) -> str:
    conf = next((e.calibrate_confidence for e in evals if e.calibrate_confidence), None)
    parts = ["# Dynamic inference: accuracy vs MACs", "",
             "Reduction = 1 - mean MACs / full-depth MACs (every stage + the last head). "
             "`<=1pt`: the cheapest swept threshold within 1 accuracy point of full depth on this split "
             "(an oracle); `val-calibrated`: that threshold chosen on the validation split, read here"
             + (f" (a threshold qualifies there only if a one-sided {100 * conf:g}% bound on its paired "
                "accuracy drop is within the point)" if conf else "") + ".", "",
             markdown_table(evals), ""]
    for e in evals:
        parts += [f"## {e.label or e.algorithm}: sweep ({e.run_dir})", "",
                  "| threshold | accuracy | mean MACs | reduction | exits taken |", "|---|---|---|---|---|"]
        parts += [f"| {p.label} | {_pct(p.result.accuracy)} | {p.result.mean_macs:,.0f} | "
                  f"{_pct(1 - p.result.mean_macs / e.full_macs)} | {' / '.join(map(str, p.result.exit_counts))} |"
                  for p in e.points]
        parts += ["", "| client | n | full-depth acc | <=1pt reduction | t=0.6 acc (delta) | t=0.6 reduction |",
                  "|---|---|---|---|---|---|"]
        for c in e.clients:
            full = next(p.result for p in c.points if p.threshold is None)
            w, r = c.savings["within_1pt"], c.savings.get(f"at_{REFERENCE_THRESHOLD:g}")
            parts.append(f"| {c.client_id} | {c.n} | {_pct(full.accuracy)} | {_pct(w.reduction)} | "
                         + (f"{_pct(r.accuracy)} ({100 * r.delta_accuracy:+.2f}) | {_pct(r.reduction)} |" if r
                            else "- | - |"))
        parts.append("")
    return "\n".join(parts)


def plot_curves(evals: Sequence[RunEvaluation], path: str | Path) -> Path:
    """Pooled accuracy vs mean MACs, one curve per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in evals:
        sw = sorted((p for p in e.points if p.threshold is not None), key=lambda p: p.result.mean_macs)
        (line,) = ax.plot([p.result.mean_macs for p in sw], [100 * p.result.accuracy for p in sw],
                          marker=".", label=e.label or e.algorithm)
        ax.plot([e.full.mean_macs], [100 * e.full.accuracy], marker="*", markersize=12, color=line.get_color())
        ref = e.savings.get(f"at_{REFERENCE_THRESHOLD:g}")
        if ref is not None:
            ax.plot([ref.mean_macs], [100 * ref.accuracy], marker="o", fillstyle="none", markersize=9,
                    color=line.get_color())
    ax.set_xlabel("mean MACs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs MACs ({evals[0].split} split; * full depth, o threshold {REFERENCE_THRESHOLD})")
    ax.grid(alpha=0.3)
    # below the axes: run labels are long and the curves fill the plot area
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(evals: Sequence[RunEvaluation], out_dir: str | Path) -> dict[str, Path]:
    """Write ``inference.md``, ``inference.json`` and ``inference.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "inference.md", "json": out / "inference.json", "plot": out / "inference.png"}
    paths["markdown"].write_text(markdown_report(evals))
    paths["json"].write_text(json.dumps({"runs": [e.to_json() for e in evals]}, indent=1) + "\n")
    plot_curves(evals, paths["plot"])
    return paths
