"""R(t), B_t and d of CAFEDistill (arXiv:2601.10015): edge cases and exactness."""

from __future__ import annotations

from fractions import Fraction

import pytest

from cafe_ray.algorithms.cafedistill.schedule import (
    progress,
    schedule_t,
    student_budget,
    tier1_depth,
)


def test_schedule_t_is_one_based() -> None:
    assert schedule_t(0) == 1
    assert schedule_t(9) == 10


def test_schedule_t_rejects_negative_round() -> None:
    with pytest.raises(ValueError, match="round index must be >= 0, got -1"):
        schedule_t(-1)


def test_first_round_already_has_progress() -> None:
    assert progress(schedule_t(0), 10) == pytest.approx(0.2)


def test_t_zero_has_no_students() -> None:
    assert progress(0, 10) == 0.0
    assert tier1_depth(0, 10, m=4) == 0
    assert student_budget(0, 10, m=4, n_t=5) == 0


@pytest.mark.parametrize("t", [5, 6, 9, 10, 15])
def test_from_half_of_training_r_is_one(t: int) -> None:
    assert progress(t, 10) == 1.0
    assert tier1_depth(t, 10, m=4) == 3
    assert student_budget(t, 10, m=4, n_t=5) == 15


def test_single_round_trains_every_student() -> None:
    assert progress(schedule_t(0), 1) == 1.0
    assert student_budget(1, 1, m=3, n_t=2) == 4


def test_budget_mid_schedule() -> None:
    # T = 10, t = 3: R = 0.6, (m-1)R = 1.8 -> d = 1, B = round(1.8 * 5) = 9, r = 4
    assert tier1_depth(3, 10, m=4) == 1
    assert student_budget(3, 10, m=4, n_t=5) == 9


def test_one_participant_rounds_half_up() -> None:
    # m = 2, T = 4, t = 1: R = 1/2, B = round(1/2) = 1 (half-up, not Python's half-to-even 0)
    assert student_budget(1, 4, m=2, n_t=1) == 1
    assert tier1_depth(1, 4, m=2) == 0


def test_one_student_network() -> None:
    # m = 2: the single student is tier 2 until R = 1, then tier 1 for everyone
    assert [tier1_depth(t, 8, m=2) for t in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [student_budget(t, 8, m=2, n_t=4) for t in range(1, 5)] == [1, 2, 3, 4]


def test_schedule_matches_exact_fractions() -> None:
    for T in range(1, 13):
        for t in range(T + 2):
            for m in range(2, 6):
                R = min(Fraction(2 * t, T), Fraction(1))
                assert tier1_depth(t, T, m) == int((m - 1) * R)
                for n_t in range(0, 7):
                    x = R * (m - 1) * n_t
                    assert student_budget(t, T, m, n_t) == int(x + Fraction(1, 2))  # half-up


def test_rejects_zero_rounds() -> None:
    with pytest.raises(ValueError, match=r"T \(number of rounds\) must be >= 1, got 0"):
        progress(1, 0)


def test_rejects_single_exit_network() -> None:
    with pytest.raises(ValueError, match=r"m \(number of exits\) must be >= 2"):
        tier1_depth(1, 10, m=1)


def test_rejects_negative_participants() -> None:
    with pytest.raises(ValueError, match=r"n_t \(number of participants\) must be >= 0, got -1"):
        student_budget(1, 10, m=3, n_t=-1)
