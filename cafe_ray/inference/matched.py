"""Equal-MAC comparison of an exit policy with thresholds, with paired bootstrap intervals.

The protocol (``cafe-ray policy equal-macs``), on every client's ``holdout`` split, pooled by
sample, with everything chosen on ``val`` (never on holdout):

1. **Operating points.** A :class:`~cafe_ray.inference.cascade.CascadePolicy` is calibrated on
   the pooled ``val`` traces to each MAC budget asked for (its one knob, ``lam``); any other
   policy (e.g. an RL :class:`~cafe_ray.inference.LearnedPolicy`) gives one point, as saved.
2. **Its matched thresholds, on val.** The policy's measured mean MACs on ``val`` are the budget
   of two threshold baselines calibrated on ``val`` (:func:`calibrate_threshold`): one *global*
   max-probability threshold for every client (the same freedom as the policy's one knob), and
   *per-client* thresholds, each matched to the policy's MACs on that client's ``val``. Both are
   deployable: they use the same data as the policy.
3. **The holdout curve.** Calibration is not exact, so the val-matched threshold may spend a
   little more or less than the policy on holdout. As a check that removes the MAC mismatch, the
   global threshold's holdout accuracy-vs-MACs curve (a dense grid of thresholds) is linearly
   interpolated at the policy's holdout MACs: the threshold family at *exactly* the policy's cost.
   It picks no threshold by holdout accuracy; it is a cost-matched reading, not an oracle.
4. **Uncertainty.** Paired bootstrap over holdout samples (the same resampled indices for both
   sides; the curve and the policy's MACs are recomputed on every resample): the accuracy
   difference policy - baseline, with a percentile 95% interval.

Policy accuracy and MACs come from :func:`~cafe_ray.inference.predict_batch` (exact per-sample
cascade MACs); thresholds are read off exit traces (:meth:`ExitTrace.threshold_exits`, the same
float32 comparison). Budgets are fractions of the full-depth forward pass
(``ExitCost.cumulative[-1]``, the denominator of every cost reduction in cafe-ray).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from cafe_ray.inference.budget import calibrate_threshold
from cafe_ray.inference.cascade import CascadePolicy, client_prior, load_exit_policy
from cafe_ray.inference.dynamic import predict_batch
from cafe_ray.inference.policies import ExitPolicy
from cafe_ray.inference.tables import markdown_rows, rich_rows
from cafe_ray.inference.trace import ExitTrace
from cafe_ray.runs import RunArtifacts

DEFAULT_BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.5)
CURVE_POINTS = 256


# ------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Interval:
    """An observed statistic and its bootstrap percentile interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    def fmt(self, scale: float = 100.0) -> str:
        return f"{scale * self.value:+.2f} [{scale * self.lo:+.2f}, {scale * self.hi:+.2f}]"


def resample_counts(n: int, resamples: int, seed: int, chunk: int = 100) -> Iterator[np.ndarray]:
    """Yield (r, n) float64 count matrices: how often each sample is drawn in each resample.

    Same ``seed`` -> same resamples, so every comparison of one report resamples alike."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs >= 1 sample and >= 1 resample, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        counts = np.zeros((r, n))
        np.add.at(counts, (np.repeat(np.arange(r), n), idx.ravel()), 1.0)
        yield counts


def _interval(observed: float, boots: np.ndarray, level: float) -> Interval:
    a = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return Interval(float(observed), float(lo), float(hi), level)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """mean(a) - mean(b) over paired samples (e.g. per-sample correctness of two policies on the
    same holdout samples) and its percentile interval over ``resamples`` resamples of samples."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired bootstrap needs two (N,) arrays of the same samples, got {a.shape} and {b.shape}")
    d = a - b
    boots = np.concatenate([w @ d / d.size for w in resample_counts(d.size, resamples, seed)])
    return _interval(float(d.mean()), boots, level)


def curve_at(macs: np.ndarray, acc: np.ndarray, at: np.ndarray | float) -> np.ndarray:
    """Accuracy of an accuracy-vs-MACs curve linearly interpolated at ``at`` MACs (clamped at the
    ends; points of equal MACs are averaged)."""
    xs, inv = np.unique(np.asarray(macs, dtype=np.float64), return_inverse=True)
    ys = np.bincount(inv, weights=np.asarray(acc, dtype=np.float64)) / np.bincount(inv)
    return np.interp(at, xs, ys)


def curve_bootstrap(policy_correct: np.ndarray, policy_macs: np.ndarray, curve_correct: np.ndarray,
                    curve_macs: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
                    ) -> tuple[Interval, float]:
    """(policy accuracy - curve accuracy at the policy's MACs, that curve accuracy).

    curve_correct, curve_macs: (G, N) per-sample correctness and MACs of G curve points (e.g.
    thresholds) on the same N samples as the policy's (N,). Every resample recomputes the policy's
    accuracy and MACs and the whole curve before interpolating."""
    pc, pm = np.asarray(policy_correct, dtype=np.float64), np.asarray(policy_macs, dtype=np.float64)
    cc, cm = np.asarray(curve_correct, dtype=np.float64), np.asarray(curve_macs, dtype=np.float64)
    n = pc.size
    if pm.shape != (n,) or cc.ndim != 2 or cc.shape[1] != n or cm.shape != cc.shape:
        raise ValueError(f"curve bootstrap: policy arrays must be (N,) and curve arrays (G, N); got "
                         f"{pc.shape}, {pm.shape}, {cc.shape}, {cm.shape}")
    ref = float(curve_at(cm.mean(axis=1), cc.mean(axis=1), pm.mean()))
    boots = []
    for w in resample_counts(n, resamples, seed):
        acc_p, macs_p = w @ pc / n, w @ pm / n  # (r,)
        acc_c, macs_c = w @ cc.T / n, w @ cm.T / n  # (r, G)
        boots += [acc_p[i] - curve_at(macs_c[i], acc_c[i], macs_p[i]) for i in range(w.shape[0])]
    return _interval(float(pc.mean()) - ref, np.asarray(boots), level), ref


# ------------------------------------------------------------------ per-sample outcomes
@dataclass
class Outcome:
    """Per-sample correctness and MACs of one policy on one split, pooled over clients."""

    correct: np.ndarray  # (N,) bool
    macs: np.ndarray  # (N,) int64
    client: np.ndarray  # (N,) client id of each sample

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_macs(self) -> float:
        return float(self.macs.mean())

    def of(self, cid: int) -> Outcome:
        sel = self.client == cid
        return Outcome(self.correct[sel], self.macs[sel], self.client[sel])

    @staticmethod
    def concat(parts: Sequence[Outcome]) -> Outcome:
        return Outcome(np.concatenate([p.correct for p in parts]), np.concatenate([p.macs for p in parts]),
                       np.concatenate([p.client for p in parts]))


def _run_policy(model: Any, x: torch.Tensor, y: torch.Tensor, policy: ExitPolicy, cost: Any, cid: int,
                batch_size: int = 1024) -> tuple[Outcome, np.ndarray]:
    correct, macs, exits = [], [], []
    for i in range(0, x.shape[0], batch_size):
        p = predict_batch(model, x[i : i + batch_size], policy, cost)
        correct.append((p.labels == y[i : i + batch_size]).numpy())
        macs.append(p.macs.numpy())
        exits.append(p.exits.numpy())
    c = np.concatenate(correct)
    return Outcome(c, np.concatenate(macs).astype(np.int64), np.full(c.size, cid)), np.concatenate(exits)


def _trace_outcome(trace: ExitTrace, exits: np.ndarray, cid: int) -> Outcome:
    return Outcome(trace.correct[np.arange(trace.num_samples), exits], trace.exit_macs[exits].astype(np.int64),
                   np.full(trace.num_samples, cid))


# ------------------------------------------------------------------ the report
@dataclass
class MatchedPoint:
    """One operating point of the policy and its three threshold references on holdout."""

    budget: float | None  # asked-for val MAC fraction (None: the policy as saved)
    knob: dict[str, Any]  # how the policy was set (e.g. {"lam": ...})
    policy_val: dict[str, float]  # accuracy, mean_macs on val
    policy: dict[str, Any]  # on holdout: accuracy, mean_macs, accuracy_ci, trace_mismatches
    global_threshold: dict[str, Any]  # threshold, val_macs, accuracy, mean_macs, diff (Interval)
    client_thresholds: dict[str, Any]  # thresholds per client, accuracy, mean_macs, diff
    curve: dict[str, Any]  # accuracy at the policy's holdout MACs, diff

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # Intervals become {value, lo, hi, level}


@dataclass
class EqualMacReport:
    run_dir: str
    policy: str
    kind: str  # "cascade" or "learned"
    split: str
    calib_split: str
    clients: list[int]
    n: int  # pooled holdout samples
    full_macs: int  # a plain full-depth forward pass (the cost-reduction denominator)
    resamples: int
    seed: int
    full_accuracy: float  # full depth on holdout
    points: list[MatchedPoint]
    curve: list[dict[str, float]] = field(default_factory=list)  # the holdout threshold curve (pooled)
    skipped_budgets: list[float] = field(default_factory=list)  # asked for, below the first exit's cost

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pooled_trace(traces: dict[int, ExitTrace]) -> ExitTrace:
    return ExitTrace.concat(list(traces.values()))


def equal_mac_comparison(run: str | Path | RunArtifacts, policy_path: str | Path, *,
                         budgets: Sequence[float] | None = None, split: str = "holdout",
                         calib_split: str = "val", clients: Sequence[int] | None = None,
                         resamples: int = 1000, seed: int = 0, curve_points: int = CURVE_POINTS,
                         level: float = 0.95) -> EqualMacReport:
    """The protocol of this module on one run: see the module docstring."""
    if split == calib_split:
        raise ValueError(f"split and calib_split are both {split!r}: report on data the calibration never saw")
    art = run if isinstance(run, RunArtifacts) else RunArtifacts(run)
    policy = load_exit_policy(policy_path)
    cost = art.exit_cost
    full = int(cost.cumulative[-1])
    ids = art.client_ids if clients is None else [int(c) for c in clients]
    models, val_tr, hold_tr, data = {}, {}, {}, {}
    for cid in ids:
        if cid not in art.splits:
            raise KeyError(f"client {cid} is not in this run (clients 0..{len(art.splits) - 1})")
        xv, yv = art.client_data(cid, calib_split)
        xh, yh = art.client_data(cid, split)
        if xv.shape[0] == 0 or xh.shape[0] == 0:
            continue
        models[cid] = art.client_model(cid)
        val_tr[cid] = ExitTrace.from_model(models[cid], xv, yv, cost)
        hold_tr[cid] = ExitTrace.from_model(models[cid], xh, yh, cost)
        data[cid] = (xv, yv, xh, yh)
    if not models:
        raise ValueError(f"{art.run_dir}: no client has samples in both {split!r} and {calib_split!r}")
    val_pool, hold_pool = _pooled_trace(val_tr), _pooled_trace(hold_tr)

    # The global threshold's holdout curve: a dense grid of thresholds (quantiles of the early
    # exits' confidences, which uses no labels) plus full depth.
    conf = hold_pool.confidence[:, :-1, 0].astype(np.float64).ravel()
    grid = np.unique(np.concatenate([[0.0], np.quantile(conf, np.linspace(0, 1, curve_points)), [math.inf]]))
    curve_parts = [[_trace_outcome(t, t.threshold_exits(g), cid) for cid, t in hold_tr.items()] for g in grid]
    curve = [Outcome.concat(p) for p in curve_parts]
    curve_correct = np.stack([o.correct for o in curve])
    curve_macs = np.stack([o.macs for o in curve])
    full_out = Outcome.concat([_trace_outcome(t, np.full(t.num_samples, t.num_exits - 1), c)
                               for c, t in hold_tr.items()])

    priors = {cid: client_prior(art, cid) for cid in models} if isinstance(policy, CascadePolicy) else {}
    if isinstance(policy, CascadePolicy):
        kind = "cascade"
        val_prior = np.concatenate([np.repeat(priors[c][None], t.num_samples, axis=0) for c, t in val_tr.items()])
        asked = list(DEFAULT_BUDGETS if budgets is None else budgets)
        for b in asked:
            if not 0.0 < b <= 1.5:
                raise ValueError(f"budget {b} is a fraction of full-depth MACs ({full:,}); use values in (0, 1]")
        first = float(cost.cascade[0])
        skipped = [b for b in asked if b * full < first]  # no policy spends less than the first exit
        asked = [b for b in asked if b * full >= first]
        if not asked:
            raise ValueError(f"every budget {skipped} is below the first exit's cost ({first / full:.3f} of full "
                             "depth); ask for larger --budgets")
        settings: list[tuple[float | None, ExitPolicy, dict[str, Any]]] = []
        for b in asked:
            lam, val_macs = policy.calibrate(val_pool, b * full, prior=val_prior)
            settings.append((b, policy.with_lam(lam), {"lam": lam, "calibrated_val_macs": val_macs}))
    else:
        if budgets:
            raise ValueError(f"{policy_path}: budgets apply to a cascade policy (`cafe-ray policy fit`); an RL "
                             "policy has one operating point, its own")
        kind = "learned"
        skipped = []
        settings = [(None, policy, policy.describe())]

    points = []
    for b, pol, knob in settings:
        val_parts, hold_parts, mismatches = [], [], 0
        for cid, model in models.items():
            xv, yv, xh, yh = data[cid]
            own = pol.for_client(priors[cid]) if isinstance(pol, CascadePolicy) else pol
            val_parts.append(_run_policy(model, xv, yv, own, cost, cid)[0])
            out, exits = _run_policy(model, xh, yh, own, cost, cid)
            hold_parts.append(out)
            if isinstance(own, CascadePolicy):  # predict_batch vs the same policy read off the trace
                mismatches += int((own.exits_at(own.prices(hold_tr[cid]), own.lam) != exits).sum())
        pv, ph = Outcome.concat(val_parts), Outcome.concat(hold_parts)
        # global threshold, calibrated on pooled val to the policy's val MACs
        t_glob, t_glob_val = calibrate_threshold(val_pool, pv.mean_macs)
        g = Outcome.concat([_trace_outcome(t, t.threshold_exits(t_glob), c) for c, t in hold_tr.items()])
        # per-client thresholds, each matched to the policy's val MACs on that client
        t_cli, parts = {}, []
        for cid, t in hold_tr.items():
            t_cli[cid], _ = calibrate_threshold(val_tr[cid], pv.of(cid).mean_macs)
            parts.append(_trace_outcome(t, t.threshold_exits(t_cli[cid]), cid))
        pc = Outcome.concat(parts)
        acc_boot = np.concatenate([w @ ph.correct / ph.correct.size
                                   for w in resample_counts(ph.correct.size, resamples, seed)])
        cdiff, cref = curve_bootstrap(ph.correct, ph.macs, curve_correct, curve_macs, resamples, seed, level)
        points.append(MatchedPoint(
            budget=b, knob=knob,
            policy_val={"accuracy": pv.accuracy, "mean_macs": pv.mean_macs},
            policy={"accuracy": ph.accuracy, "mean_macs": ph.mean_macs, "reduction": 1 - ph.mean_macs / full,
                    "accuracy_ci": _interval(ph.accuracy, acc_boot, level), "trace_mismatches": mismatches},
            global_threshold={"threshold": _finite(t_glob), "val_macs": t_glob_val, "accuracy": g.accuracy,
                              "mean_macs": g.mean_macs,
                              "diff": paired_bootstrap(ph.correct, g.correct, resamples, seed, level)},
            client_thresholds={"thresholds": {c: _finite(v) for c, v in t_cli.items()}, "accuracy": pc.accuracy,
                               "mean_macs": pc.mean_macs,
                               "diff": paired_bootstrap(ph.correct, pc.correct, resamples, seed, level)},
            curve={"accuracy": cref, "at_macs": ph.mean_macs, "diff": cdiff},
        ))
    curve_rows = [{"threshold": _finite(t), "accuracy": o.accuracy, "mean_macs": o.mean_macs}
                  for t, o in zip(grid, curve, strict=True)]
    return EqualMacReport(str(art.run_dir), str(policy_path), kind, split, calib_split, list(models),
                          int(full_out.correct.size), full, resamples, seed, full_out.accuracy, points, curve_rows,
                          skipped)


def _finite(t: float) -> float | None:
    """A threshold for JSON: None for full depth (inf)."""
    return None if math.isinf(t) else float(t)


# ------------------------------------------------------------------ reporting
_COLS = ("val budget", "policy acc [95% CI]", "policy MACs (red.)", "vs global thr (its MACs)",
         "vs per-client thr (its MACs)", "vs thr curve @ policy MACs")


def _rows(r: EqualMacReport) -> list[list[str]]:
    rows = []
    for p in r.points:
        pol, g, c, cu = p.policy, p.global_threshold, p.client_thresholds, p.curve
        ci = pol["accuracy_ci"]
        rows.append([
            "as saved" if p.budget is None else f"{100 * p.budget:.0f}%",
            f"{100 * pol['accuracy']:.2f}% [{100 * ci.lo:.2f}, {100 * ci.hi:.2f}]",
            f"{pol['mean_macs']:,.0f} ({100 * pol['reduction']:.1f}%)",
            f"{g['diff'].fmt()} ({g['mean_macs']:,.0f})",
            f"{c['diff'].fmt()} ({c['mean_macs']:,.0f})",
            f"{cu['diff'].fmt()}",
        ])
    return rows


def rich_equal_macs(r: EqualMacReport) -> Table:
    return rich_rows(f"{r.kind} policy vs thresholds at equal MACs on {r.split} ({len(r.clients)} clients, "
                     f"{r.n} samples; accuracy differences in points, paired bootstrap {r.resamples}x)",
                     _COLS, _rows(r))


def markdown_equal_macs(r: EqualMacReport) -> str:
    lines = [f"# {r.kind} exit policy vs thresholds at equal MACs on `{r.split}`", "",
             f"Run `{r.run_dir}`, policy `{r.policy}`, {len(r.clients)} clients, {r.n} {r.split} samples pooled. "
             f"Full depth: {100 * r.full_accuracy:.2f}% at {r.full_macs:,} MACs. Differences are policy - "
             f"threshold in accuracy points, with the {100 * r.points[0].global_threshold['diff'].level:.0f}% "
             f"interval of a paired bootstrap over {r.split} samples ({r.resamples} resamples, seed {r.seed}). "
             f"Thresholds are calibrated on `{r.calib_split}` to the policy's `{r.calib_split}` MACs (global: one "
             "threshold for every client; per-client: one per client); the curve column interpolates the global "
             f"threshold's `{r.split}` curve at the policy's `{r.split}` MACs (exactly equal cost).", "",
             *markdown_rows(_COLS, _rows(r))]
    if r.skipped_budgets:
        lines += ["", f"Budgets {r.skipped_budgets} were skipped: below the first exit's cost."]
    return "\n".join(lines) + "\n"


def plot_equal_macs(r: EqualMacReport, path: str | Path) -> Path:
    """Holdout accuracy vs MACs: the threshold curve, the policy's points with their 95% intervals,
    and the val-matched global thresholds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cur = sorted(r.curve, key=lambda p: p["mean_macs"])
    ax.plot([p["mean_macs"] for p in cur], [100 * p["accuracy"] for p in cur], "-", color="tab:blue",
            label="threshold (holdout curve)")
    ax.plot([r.full_macs], [100 * r.full_accuracy], "*", markersize=12, color="tab:blue", label="full depth")
    gx = [p.global_threshold["mean_macs"] for p in r.points]
    gy = [100 * p.global_threshold["accuracy"] for p in r.points]
    ax.plot(gx, gy, "x", color="tab:gray", markersize=8, label="threshold calibrated on val")
    px = [p.policy["mean_macs"] for p in r.points]
    py = np.array([100 * p.policy["accuracy"] for p in r.points])
    lo = py - np.array([100 * p.policy["accuracy_ci"].lo for p in r.points])
    hi = np.array([100 * p.policy["accuracy_ci"].hi for p in r.points]) - py
    ax.errorbar(px, py, yerr=[lo, hi], fmt="o", color="tab:red", capsize=3, label=f"{r.kind} policy (95% CI)")
    ax.set_xlabel("mean MACs per sample")
    ax.set_ylabel(f"{r.split} accuracy (%)")
    ax.set_title(f"{r.kind} policy vs threshold on {r.split} ({r.n} samples)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_equal_macs(r: EqualMacReport, out_dir: str | Path) -> dict[str, Path]:
    """``equal_macs.md``, ``equal_macs.json`` and ``equal_macs.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "equal_macs.md", "json": out / "equal_macs.json", "plot": out / "equal_macs.png"}
    paths["markdown"].write_text(markdown_equal_macs(r))
    paths["json"].write_text(json.dumps(r.to_json(), indent=1, default=_json_default) + "\n")
    plot_equal_macs(r, paths["plot"])
    return paths


def _json_default(v: Any) -> Any:
    if isinstance(v, Interval):
        return v.to_json()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
