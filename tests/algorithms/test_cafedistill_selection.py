"""Two-tier student selection of CAFEDistill (arXiv:2601.10015) on crafted examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cafe_ray.algorithms.cafedistill.selection import (
    cosine,
    head_cosine_scores,
    keys_feeding_exit,
    least_conflict,
    plan_students,
    select_students,
    tier_exits,
    update_cosine_scores,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_tier_exits_shallow_first() -> None:
    assert tier_exits(2, m=5, order="shallow_first") == ((0, 1), 2)


def test_tier_exits_deep_first_is_the_mirror() -> None:
    assert tier_exits(2, m=5, order="deep_first") == ((2, 3), 1)


def test_tier_exits_full_depth_has_no_tier_two() -> None:
    assert tier_exits(4, m=5) == ((0, 1, 2, 3), None)
    assert tier_exits(4, m=5, order="deep_first") == ((0, 1, 2, 3), None)


def test_plan_mid_schedule() -> None:
    # T = 8, t = 2: R = 1/2, (m-1)R = 1.5 -> d = 1, B = 6, r = 2 of n_t = 4
    plan = plan_students(2, 8, m=4, n_t=4)
    assert (plan.R, plan.depth, plan.budget, plan.tier1, plan.tier2_exit, plan.slots) == (0.5, 1, 6, (0,), 1, 2)


def test_plan_first_round_of_one_student_network() -> None:
    plan = plan_students(1, 10, m=2, n_t=3)  # R = 0.2: B = round(0.6) = 1
    assert (plan.depth, plan.tier1, plan.tier2_exit, plan.slots) == (0, (), 0, 1)


def test_plan_without_remainder_has_no_tier_two() -> None:
    plan = plan_students(5, 10, m=3, n_t=3)  # R = 1
    assert (plan.tier1, plan.tier2_exit, plan.slots) == ((0, 1), None, 0)


def test_tier_one_and_two_membership() -> None:
    plan = plan_students(2, 8, m=4, n_t=4)  # tier 1: exit 0; 2 slots of exit 1
    scores = {0: -0.5, 1: 0.9, 2: 0.1, 3: 0.8}
    s = select_students(plan, [0, 1, 2, 3], scores, rng())
    assert s == {0: (0,), 1: (0, 1), 2: (0,), 3: (0, 1)}


def test_deep_first_membership_is_mirrored() -> None:
    plan = plan_students(2, 8, m=4, n_t=4, order="deep_first")  # tier 1: exit 2; 2 slots of exit 1
    scores = {0: -0.5, 1: 0.9, 2: 0.1, 3: 0.8}
    s = select_students(plan, [0, 1, 2, 3], scores, rng())
    assert s == {0: (2,), 1: (1, 2), 2: (2,), 3: (1, 2)}


def test_schedule_all_gives_every_student() -> None:
    plan = plan_students(1, 100, m=4, n_t=3, schedule="all")
    s = select_students(plan, [3, 5, 9], {}, rng())
    assert s == {3: (0, 1, 2), 5: (0, 1, 2), 9: (0, 1, 2)}
    assert plan.budget == 9


def test_total_students_equal_the_budget() -> None:
    gen = rng(1)
    for T in (3, 7, 10):
        for t in range(1, T + 1):
            for m in (2, 3, 5):
                for n_t in (1, 2, 5):
                    plan = plan_students(t, T, m, n_t)
                    scores = {c: float(gen.normal()) for c in range(n_t)}
                    s = select_students(plan, list(range(n_t)), scores, gen)
                    assert sum(len(v) for v in s.values()) == plan.budget


def test_no_history_ranks_between_agreeing_and_conflicting() -> None:
    # client 7 has no score (0): behind 1 (agrees), ahead of 2 (conflicts)
    assert least_conflict([1, 2, 7], {1: 0.3, 2: -0.3}, 2, rng()) == (1, 7)


def test_ties_break_by_the_seeded_rng() -> None:
    picks = {least_conflict(list(range(6)), {}, 2, rng(seed)) for seed in range(20)}
    assert len(picks) > 1  # not always the same clients
    assert least_conflict(list(range(6)), {}, 2, rng(3)) == least_conflict(list(range(6)), {}, 2, rng(3))


def test_least_conflict_rejects_too_many_slots() -> None:
    with pytest.raises(ValueError, match=r"tier-2 slots r must be in \[0, 2\]"):
        least_conflict([0, 1], {}, 3, rng())


def test_plan_rejects_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="selection.schedule must be one of"):
        plan_students(1, 10, m=3, n_t=2, schedule="sometimes")


def test_plan_rejects_unknown_order() -> None:
    with pytest.raises(ValueError, match="selection.order must be one of"):
        plan_students(1, 10, m=3, n_t=2, order="middle_first")


def test_keys_feeding_exit_are_stages_up_to_the_exit() -> None:
    keys = ["stages.0.w", "stages.1.w", "stages.2.w", "exits.0.w"]
    assert keys_feeding_exit(keys, 1) == ["stages.0.w", "stages.1.w"]


def test_update_cosine_uses_only_stages_feeding_the_tier_two_exit() -> None:
    keys = keys_feeding_exit(["stages.0.w", "stages.1.w", "stages.2.w"], 1)
    ref = {"stages.0.w": torch.tensor([1.0, 0.0]), "stages.1.w": torch.tensor([1.0]), "stages.2.w": torch.tensor([1.0])}
    updates = {
        # agrees on stages 0-1, fights hard on stage 2 (which exit 1 does not see)
        0: {"stages.0.w": torch.tensor([2.0, 0.0]), "stages.1.w": torch.tensor([2.0]), "stages.2.w": torch.tensor([-100.0])},
        # conflicts on stages 0-1
        1: {"stages.0.w": torch.tensor([-1.0, 0.0]), "stages.1.w": torch.tensor([-1.0]), "stages.2.w": torch.tensor([1.0])},
    }
    scores = update_cosine_scores([0, 1, 2], updates, ref, keys)
    assert scores == pytest.approx({0: 1.0, 1: -1.0, 2: 0.0})
    plan = plan_students(2, 8, m=4, n_t=3)  # tier 1 exit 0; r = round(1.5) = 2 slots of exit 1
    s = select_students(plan, [0, 1, 2], scores, rng())
    assert s == {0: (0, 1), 1: (0,), 2: (0, 1)}


def test_update_cosine_without_reference_is_all_zero() -> None:
    assert update_cosine_scores([4, 5], {}, None, ["stages.0.w"]) == {4: 0.0, 5: 0.0}


def test_head_cosine_scores_the_head_closest_to_the_mean() -> None:
    heads = {0: torch.tensor([1.0, 0.1]), 1: torch.tensor([1.0, -0.1]), 2: torch.tensor([-0.2, 1.0])}
    scores = head_cosine_scores([0, 1, 2, 3], heads)
    assert scores[3] == 0.0  # no stored head
    assert min(scores[0], scores[1]) > scores[2]


def test_cosine_of_zero_vector_is_zero() -> None:
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0
