"""A learned exit policy against threshold and budget policies, at equal mean MACs.

On each client's held-out split (``holdout``, never used for training or calibration):

* ``full``: full depth, the reference accuracy;
* ``learned``: the saved policy;
* ``threshold 0.6``: the paper's fixed operating point;
* ``threshold @ learned MACs``: the best single threshold of a sweep *on the holdout split
  itself* whose mean MACs do not exceed the learned policy's there: an oracle, the strongest a
  threshold can do at that cost;
* ``budget @ learned MACs``: a threshold calibrated on ``val`` to the learned policy's mean MACs
  on ``val``: the deployable counterpart, with the same information as the learned policy.

Rows are pooled over clients weighted by holdout size. All numbers come from
:func:`~cafe_ray.inference.predict_batch` (exact per-sample MACs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from cafe_ray.inference.budget import BudgetThreshold
from cafe_ray.inference.evaluate import PolicyResult, evaluate_policy, pooled, sweep, threshold_grid
from cafe_ray.inference.learned import LearnedPolicy
from cafe_ray.inference.policies import FullDepth, Threshold
from cafe_ray.inference.tables import markdown_rows, rich_rows
from cafe_ray.runs import RunArtifacts

ROWS = ("full", "learned", "threshold 0.6", "threshold @ learned MACs", "budget @ learned MACs")


@dataclass
class PolicyComparison:
    run_dir: str
    policy: str
    split: str
    calib_split: str
    full_macs: int  # every stage + the last head: the cost reduction's denominator
    rows: dict[str, PolicyResult]  # pooled, keyed by ROWS
    clients: dict[int, dict[str, PolicyResult]]
    settings: dict[int, dict[str, Any]]  # per client: thresholds chosen, budget targets

    def reduction(self, r: PolicyResult) -> float:
        return 1.0 - r.mean_macs / self.full_macs

    def to_json(self) -> dict[str, Any]:
        def block(rows: dict[str, PolicyResult]) -> dict[str, Any]:
            return {k: {**v.to_json(), "reduction": self.reduction(v)} for k, v in rows.items()}

        return {"run_dir": self.run_dir, "policy": self.policy, "split": self.split,
                "calib_split": self.calib_split, "full_depth_macs": self.full_macs, "pooled": block(self.rows),
                "clients": [{"client": c, **block(rows), "settings": self.settings[c]}
                            for c, rows in self.clients.items()]}


def compare_learned(run: str | Path | RunArtifacts, policy_path: str | Path | Mapping[int, str | Path], *,
                    split: str = "holdout", calib_split: str = "val", steps: int = 41,
                    clients: Sequence[int] | None = None) -> PolicyComparison:
    """Compare a learned policy with threshold and budget policies.

    ``policy_path``: one policy for every client, or a mapping client id -> that client's policy
    (then only those clients are compared).
    """
    art = run if isinstance(run, RunArtifacts) else RunArtifacts(run)
    cost = art.exit_cost
    if isinstance(policy_path, Mapping):
        policies = {int(c): LearnedPolicy(p) for c, p in policy_path.items()}
        ids = sorted(policies) if clients is None else list(clients)
        if missing := [c for c in ids if c not in policies]:
            raise ValueError(f"no learned policy given for clients {missing}")
        label = f"{len(policies)} per-client policies"
    else:
        shared = LearnedPolicy(policy_path)
        policies = {c: shared for c in art.client_ids}
        ids = art.client_ids if clients is None else list(clients)
        label = str(policy_path)
    grid = threshold_grid(steps)
    per: dict[int, dict[str, PolicyResult]] = {}
    settings: dict[int, dict[str, Any]] = {}
    for cid in ids:
        if cid not in art.splits:
            raise KeyError(f"client {cid} is not in this run (clients 0..{len(art.splits) - 1})")
        learned = policies[cid]
        xh, yh = art.client_data(cid, split)
        xv, yv = art.client_data(cid, calib_split)
        if xh.shape[0] == 0 or xv.shape[0] == 0:
            continue
        model = art.client_model(cid)
        lh = evaluate_policy(model, xh, yh, learned, cost)
        lv = evaluate_policy(model, xv, yv, learned, cost)
        pts = [p for p in sweep(model, xh, yh, cost, grid) if p.threshold is not None]
        ok = [p for p in pts if p.result.mean_macs <= lh.mean_macs + 1e-9] or [min(pts, key=lambda p: p.result.mean_macs)]
        oracle = max(ok, key=lambda p: (p.result.accuracy, -p.result.mean_macs))
        target = max(lv.mean_macs, float(cost.cascade[0]))
        budget = BudgetThreshold(model, xv, cost, target)
        per[cid] = {
            "full": evaluate_policy(model, xh, yh, FullDepth(), cost),
            "learned": lh,
            "threshold 0.6": evaluate_policy(model, xh, yh, Threshold(0.6), cost),
            "threshold @ learned MACs": oracle.result,
            "budget @ learned MACs": evaluate_policy(model, xh, yh, budget, cost),
        }
        settings[cid] = {"oracle_threshold": oracle.threshold, "budget_macs": target,
                         "budget_threshold": budget.describe()["threshold"],
                         "learned_val": lv.to_json()}
    if not per:
        raise ValueError(f"{art.run_dir}: no client has samples in both {split!r} and {calib_split!r}")
    rows = {k: pooled([p[k] for p in per.values()]) for k in ROWS}
    return PolicyComparison(str(art.run_dir), label, split, calib_split, int(cost.cumulative[-1]),
                            rows, per, settings)


# ------------------------------------------------------------------ reporting
_COLS = ("policy", "accuracy", "delta vs learned", "mean MACs", "reduction", "exits taken")


def _rows(c: PolicyComparison) -> list[list[str]]:
    base = c.rows["learned"].accuracy
    return [[k, f"{100 * r.accuracy:.2f}%", f"{100 * (r.accuracy - base):+.2f}", f"{r.mean_macs:,.0f}",
             f"{100 * c.reduction(r):.2f}%", " / ".join(map(str, r.exit_counts))] for k, r in c.rows.items()]


def rich_comparison(c: PolicyComparison) -> Table:
    return rich_rows(f"exit policies on {c.split} ({len(c.clients)} clients, pooled): {Path(c.policy).name}",
                     _COLS, _rows(c), left=("policy",))


def markdown_comparison(c: PolicyComparison) -> str:
    lines = [f"# Exit policies on `{c.split}`: learned vs threshold vs budget", "",
             f"Run `{c.run_dir}`, policy `{c.policy}`, {len(c.clients)} clients pooled by {c.split} size. "
             f"Reduction = 1 - mean MACs / {c.full_macs:,} (full depth). `threshold @ learned MACs` is the best "
             f"threshold tuned on {c.split} itself (an oracle) with mean MACs <= the learned policy's; "
             f"`budget @ learned MACs` is calibrated on {c.calib_split} to the learned policy's {c.calib_split} MACs.",
             "", *markdown_rows(_COLS, _rows(c))]
    return "\n".join(lines) + "\n"


def write_comparison(c: PolicyComparison, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "json": out / "compare.json"}
    paths["markdown"].write_text(markdown_comparison(c))
    paths["json"].write_text(json.dumps(c.to_json(), indent=1) + "\n")
    return paths
