"""Progressive student schedule of CAFEDistill (arXiv:2601.10015), step 2.

R(t) = min(2t/T, 1) grows linearly over the first half of training and stays at 1
afterwards; the round's student budget is B_t = round(R(t) * (m-1) * n_t) student
slots over the n_t participants, and tier 1 gives every participant
d = floor((m-1) * R(t)) students.

Round index: the simulator's ``RoundContext.round`` is 0-based; the schedule uses
the 1-based ``t = round + 1`` (:func:`schedule_t`), so that the first round of T
already has R(1) = 2/T > 0 and the last round has t = T. With a 0-based t the
first round would train the teacher alone whatever T is.

Arithmetic is exact (integers), so floor((m-1)*R(t)) never suffers from a
0.999... float error, and ``round`` is half-up (Python's ``round`` is
half-to-even, which would make the budget of e.g. R = 1/2, n_t = 1 zero).
"""

from __future__ import annotations


def schedule_t(round_index: int) -> int:
    """The 1-based schedule index t of the 0-based simulator round ``round_index``."""
    if round_index < 0:
        raise ValueError(f"round index must be >= 0, got {round_index}")
    return round_index + 1


def _check(t: int, T: int, m: int | None = None, n_t: int | None = None) -> None:
    if T < 1:
        raise ValueError(f"T (number of rounds) must be >= 1, got {T}")
    if t < 0:
        raise ValueError(f"t must be >= 0 (1-based round; see schedule_t), got {t}")
    if m is not None and m < 2:
        raise ValueError(f"m (number of exits) must be >= 2 (one teacher, >= 1 student), got {m}")
    if n_t is not None and n_t < 0:
        raise ValueError(f"n_t (number of participants) must be >= 0, got {n_t}")


def _progress_fraction(t: int, T: int) -> tuple[int, int]:
    """R(t) as the exact fraction (numerator, denominator)."""
    return min(2 * t, T), T


def progress(t: int, T: int) -> float:
    """R(t) = min(2t/T, 1): the fraction of students trained at round t (1-based)."""
    _check(t, T)
    num, den = _progress_fraction(t, T)
    return num / den


def tier1_depth(t: int, T: int, m: int) -> int:
    """d = floor((m-1) * R(t)): students every participant gets in tier 1."""
    _check(t, T, m)
    num, den = _progress_fraction(t, T)
    return (m - 1) * num // den


def student_budget(t: int, T: int, m: int, n_t: int) -> int:
    """B_t = round(R(t) * (m-1) * n_t), half-up: student slots of round t."""
    _check(t, T, m, n_t)
    num, den = _progress_fraction(t, T)
    return (2 * (m - 1) * n_t * num + den) // (2 * den)
