"""Budget policy: a confidence threshold calibrated to a mean MAC budget per sample.

Mean MACs under a max-probability threshold never decrease as the threshold rises (each
sample stops at the first exit whose confidence reaches it), so the best threshold for a
budget is the largest one whose mean cascade MACs on calibration data stay within it. The
search is exact: mean MACs only change at the observed confidences, so every gap between two
consecutive confidences is tried, and the threshold is set in the middle of the chosen gap
(robust to float noise between a full-batch trace and predict_batch's shrinking batches).

Calibrate per client, on that client's ``val`` split; report on ``holdout``
(:meth:`cafe_ray.runs.RunArtifacts.client_data`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cafe_ray.inference.policies import ExitPolicy, register_policy
from cafe_ray.inference.trace import ExitTrace
from cafe_ray.models import EarlyExitNet, ExitCost

if TYPE_CHECKING:
    from cafe_ray.runs import RunArtifacts


def calibrate_threshold(trace: ExitTrace, budget: float) -> tuple[float, float]:
    """(threshold, mean MACs on the trace): the largest threshold whose mean MACs <= ``budget``.

    ``math.inf`` means every sample may run to full depth. Raises when even exiting everything at
    the first exit exceeds the budget.
    """
    cheapest = int(trace.exit_macs[0])
    if budget < cheapest:
        raise ValueError(f"budget {budget:,.0f} MACs/sample is below the first exit's {cheapest:,} MACs: no "
                         f"threshold can meet it; use a budget >= {cheapest:,} (full depth is "
                         f"{trace.full_macs:,})")
    if budget >= trace.full_macs:
        return math.inf, float(trace.full_macs)
    values = np.unique(trace.confidence[:, :-1, 0].astype(np.float64))  # sorted confidences of early exits
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # torch compares in float32
    cands = np.unique(np.concatenate([[0.0], mids, [math.inf]]).astype(np.float32)).astype(np.float64)
    # mean MACs is non-decreasing along cands: binary search the last feasible one.
    lo, hi = 0, len(cands) - 1  # cands[0] = 0 (all exit first) is feasible, checked above
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if trace.mean_macs(trace.threshold_exits(cands[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    t = float(cands[lo])
    return t, trace.mean_macs(trace.threshold_exits(t))


class BudgetThreshold(ExitPolicy):
    """Max-probability threshold calibrated so that mean MACs per sample <= ``budget``.

    Built from a model, its calibration inputs (``x`` or ``(x, y)``), its :class:`ExitCost` and a
    budget in MACs per sample; or from an already calibrated ``threshold``.
    """

    name = "budget"

    def __init__(self, model: EarlyExitNet | None = None, data: Any = None, cost: ExitCost | None = None,
                 budget: float | None = None, *, threshold: float | None = None) -> None:
        if threshold is not None:
            if model is not None or data is not None:
                raise ValueError("budget policy: give either threshold= or (model, data, cost, budget), not both")
            if threshold < 0 or math.isnan(threshold):
                raise ValueError(f"budget policy: threshold must be >= 0 (inf = full depth), got {threshold}")
            self.threshold, self.budget, self.calibrated_macs = float(threshold), budget, None
            return
        missing = [n for n, v in (("model", model), ("data", data), ("cost", cost), ("budget", budget)) if v is None]
        if missing:
            raise ValueError(f"budget policy: missing {', '.join(missing)}; build it as build_policy('budget', "
                             "model=..., data=x_val, cost=..., budget=MACS_PER_SAMPLE)")
        assert model is not None and cost is not None and budget is not None
        x = data[0] if isinstance(data, tuple | list) else data
        y = torch.zeros(x.shape[0], dtype=torch.long)  # labels are not needed to meet a cost
        trace = ExitTrace.from_model(model, x, y, cost)
        self.budget = float(budget)
        self.threshold, self.calibrated_macs = calibrate_threshold(trace, self.budget)

    @classmethod
    def from_run(cls, run: RunArtifacts, client_id: int, budget: float, split: str = "val") -> BudgetThreshold:
        """Calibrate on client ``client_id``'s ``split`` of a finished run."""
        x, _ = run.client_data(client_id, split)
        return cls(run.client_model(client_id), x, run.exit_cost, budget)

    def should_exit(self, probs, k, num_exits, macs_spent):
        return probs.max(dim=1).values >= self.threshold

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "budget": self.budget,
                "threshold": None if math.isinf(self.threshold) else self.threshold,
                "full_depth": math.isinf(self.threshold), "calibrated_macs": self.calibrated_macs}


register_policy("budget", BudgetThreshold)
