"""Budget policy: the calibrated threshold meets its mean MAC budget on the calibration split."""

import math

import numpy as np
import pytest
import torch

from cafe_ray.inference import (
    BudgetThreshold,
    ExitTrace,
    Threshold,
    build_policy,
    calibrate_threshold,
)
from cafe_ray.inference.evaluate import evaluate_policy
from tests.inference.helpers import (
    HAND_CASCADE,
    HAND_COST,
    HAND_LABELS,
    HAND_LOGITS,
    as_input,
    sliced_een,
)


def hand_trace() -> ExitTrace:
    return ExitTrace(HAND_LOGITS.numpy(), HAND_LABELS.numpy(), HAND_CASCADE)


@pytest.mark.parametrize(("budget", "macs"), [
    (110, 110.0),  # only "everyone at exit 0" fits
    (200, 550 / 3),  # 110 + 330 + 110: threshold in (0.333, 0.452]
    (400, 1100 / 3),  # 110 + 330 + 660: threshold in (0.452, 0.909]
    (659, 1100 / 3),
    (660, 660.0),  # full depth allowed
])
def test_calibration_is_the_largest_threshold_within_budget(budget, macs):
    t, got = calibrate_threshold(hand_trace(), budget)
    assert got == pytest.approx(macs) and got <= budget
    # and predict_batch agrees with the calibration's own count
    r = evaluate_policy(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_LABELS, Threshold(min(t, 1.0))
                        if not math.isinf(t) else build_policy("full"), HAND_COST)
    assert r.mean_macs == pytest.approx(macs)


def test_budget_below_the_first_exit_is_an_error():
    with pytest.raises(ValueError, match="below the first exit's 110 MACs.*use a budget >= 110"):
        calibrate_threshold(hand_trace(), 100)


def test_built_by_name_from_model_data_cost_budget():
    pol = build_policy("budget", model=sliced_een(3, 3), data=as_input(HAND_LOGITS), cost=HAND_COST, budget=400)
    assert isinstance(pol, BudgetThreshold) and 0.452 < pol.threshold <= 0.909
    d = pol.describe()
    assert d["policy"] == "budget" and d["budget"] == 400 and d["calibrated_macs"] == pytest.approx(1100 / 3)
    full = BudgetThreshold(sliced_een(3, 3), as_input(HAND_LOGITS), HAND_COST, 10_000)
    assert full.describe()["full_depth"] and full.describe()["threshold"] is None


def test_budget_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="missing data, budget"):
        BudgetThreshold(sliced_een(3, 3), cost=HAND_COST)
    with pytest.raises(ValueError, match="either threshold= or"):
        BudgetThreshold(sliced_een(3, 3), threshold=0.5)
    assert BudgetThreshold(threshold=0.5).threshold == 0.5


def test_random_traces_always_meet_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(200, 3, 5, generator=g) * 3
        x, y = as_input(logits), torch.randint(0, 5, (200,), generator=g)
        model = sliced_een(3, 5)
        for budget in (150, 300, 450, 600):
            pol = BudgetThreshold(model, x, HAND_COST, budget)
            r = evaluate_policy(model, x, y, pol, HAND_COST)
            assert r.mean_macs <= budget
            # the next larger distinct threshold would break the budget (the search is tight)
            conf = np.unique(logits.softmax(2)[:, :-1].max(2).values.numpy())
            above = conf[conf >= pol.threshold]
            if above.size:
                nxt = float(above[0]) + 1e-6
                assert evaluate_policy(model, x, y, Threshold(min(nxt, 1.0)), HAND_COST).mean_macs > budget


def test_calibrated_on_a_clients_val_split_meets_the_budget_there(run_dir):
    from cafe_ray.runs import RunArtifacts

    art = RunArtifacts(run_dir)
    cost = art.exit_cost
    for cid in (0, 3):
        x, y = art.client_data(cid, "val")
        model = art.client_model(cid)
        for frac in (0.3, 0.6, 0.9):
            budget = frac * cost.cascade[-1]
            pol = BudgetThreshold.from_run(art, cid, budget)
            assert evaluate_policy(model, x, y, pol, cost).mean_macs <= budget
