"""Two-tier, depth-prioritized student selection of CAFEDistill (arXiv:2601.10015), step 3.

Pure functions. Exits are 0-based here: 0..m-2 are the students, m-1 the teacher.

- Tier 1 (depth priority): every participant gets d = floor((m-1) * R(t))
  students: the d shallowest (``order="shallow_first"``, exits 0..d-1) or the d
  deepest (``order="deep_first"``, exits m-1-d..m-2, the mirror image).
- Tier 2 (conflict-aware, within one depth): the r = B_t - d*n_t remaining slots
  go to the next exit (``shallow_first``: exit d; ``deep_first``: exit m-2-d) of
  the r participants with the least conflict, i.e. the highest score.

Conflict proxies (``selection.similarity``), each a map client id -> score:
- ``update_cosine``: cosine between the client's latest backbone update and the
  previous round's aggregated update, both restricted to the stages feeding the
  tier-2 exit (stages 0..e for exit e, i.e. 1..d+1 in the paper's 1-based
  notation for shallow_first); :func:`update_cosine_scores`.
- ``head_cosine``: cosine of the client's tier-2 exit head to the participants'
  mean head; :func:`head_cosine_scores`.
- ``random``: every score 0, so the seeded tie-break alone decides.
Clients without history score 0; ties break by the seeded numpy RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cafe_ray.algorithms.aggregation import flatten
from cafe_ray.algorithms.base import Params
from cafe_ray.algorithms.cafedistill.schedule import progress, student_budget, tier1_depth
from cafe_ray.models.base import stage_of_key

SCHEDULES = ("progressive", "all")
ORDERS = ("shallow_first", "deep_first")


@dataclass(frozen=True)
class StudentPlan:
    """What round t's schedule allows, before any client is named."""

    R: float  # R(t), 1.0 under schedule "all"
    budget: int  # B_t: student slots over all participants
    depth: int  # d: students every participant gets in tier 1
    tier1: tuple[int, ...]  # the d tier-1 student exits (0-based), same for everyone
    tier2_exit: int | None  # the exit competed for in tier 2 (0-based); None when r = 0
    slots: int  # r = B_t - d*n_t: participants that get tier2_exit


def tier_exits(d: int, m: int, order: str = "shallow_first") -> tuple[tuple[int, ...], int | None]:
    """(tier-1 exits, tier-2 exit) for depth d of an m-exit network (0-based exits)."""
    if order not in ORDERS:
        raise ValueError(f"selection.order must be one of {ORDERS}, got {order!r}")
    if not 0 <= d <= m - 1:
        raise ValueError(f"depth d must be in [0, m-1] = [0, {m - 1}], got {d}")
    if order == "shallow_first":
        return tuple(range(d)), (d if d < m - 1 else None)
    return tuple(range(m - 1 - d, m - 1)), (m - 2 - d if d < m - 1 else None)


def plan_students(
    t: int, T: int, m: int, n_t: int, *, schedule: str = "progressive", order: str = "shallow_first"
) -> StudentPlan:
    """Round t's (1-based) student plan: R(t), B_t, d, the tier-1 exits, the tier-2 exit and r."""
    if schedule not in SCHEDULES:
        raise ValueError(f"selection.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "all":
        tier1, _ = tier_exits(m - 1, m, order)
        return StudentPlan(R=1.0, budget=(m - 1) * n_t, depth=m - 1, tier1=tier1, tier2_exit=None, slots=0)
    d = tier1_depth(t, T, m)
    budget = student_budget(t, T, m, n_t)
    tier1, tier2 = tier_exits(d, m, order)
    slots = budget - d * n_t  # in [0, n_t]: B_t - d*n_t = round(frac((m-1)R) * n_t)
    return StudentPlan(
        R=progress(t, T), budget=budget, depth=d, tier1=tier1,
        tier2_exit=tier2 if slots > 0 else None, slots=slots,
    )


def least_conflict(
    candidates: Sequence[int], scores: Mapping[int, float], r: int, rng: np.random.Generator
) -> tuple[int, ...]:
    """The r candidates with the highest score (least conflict), sorted by id.

    Missing scores count as 0 (no history). Ties break by a random permutation
    drawn from ``rng``, which is drawn even when r = 0 so that the RNG stream
    does not depend on the scores.
    """
    if not 0 <= r <= len(candidates):
        raise ValueError(f"tier-2 slots r must be in [0, {len(candidates)}] (the participants), got {r}")
    tiebreak = rng.permutation(len(candidates))
    ranked = sorted(
        range(len(candidates)),
        key=lambda i: (-float(scores.get(candidates[i], 0.0)), int(tiebreak[i])),
    )
    return tuple(sorted(candidates[i] for i in ranked[:r]))


def select_students(
    plan: StudentPlan,
    participants: Sequence[int],
    scores: Mapping[int, float],
    rng: np.random.Generator,
) -> dict[int, tuple[int, ...]]:
    """S_i for every participant: tier-1 exits, plus the tier-2 exit for the winners."""
    winners = (
        set(least_conflict(list(participants), scores, plan.slots, rng))
        if plan.tier2_exit is not None
        else set()
    )
    out: dict[int, tuple[int, ...]] = {}
    for cid in participants:
        s = set(plan.tier1)
        if cid in winners and plan.tier2_exit is not None:  # winners exist only with a tier-2 exit
            s.add(plan.tier2_exit)
        out[cid] = tuple(sorted(s))
    return out


# ------------------------------------------------------------------ conflict proxies
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors; 0 when either is all zeros (no direction, no conflict)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a.to(torch.float64), b.to(torch.float64))) / (na * nb)


def keys_feeding_exit(keys: Iterable[str], e: int) -> list[str]:
    """The backbone keys of stages 0..e: the stages exit e's output depends on."""
    return sorted(k for k in keys if (s := stage_of_key(k)) is not None and s <= e)


def update_cosine_scores(
    participants: Sequence[int],
    updates: Mapping[int, Params],
    reference: Params | None,
    keys: Sequence[str],
) -> dict[int, float]:
    """cos(client update, previous aggregated update) over ``keys``; 0 without history."""
    if reference is None or not keys:
        return {cid: 0.0 for cid in participants}
    ref = flatten(reference, keys)
    return {
        cid: cosine(flatten(updates[cid], keys), ref) if cid in updates else 0.0
        for cid in participants
    }


def head_cosine_scores(participants: Sequence[int], heads: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """cos(client's flattened tier-2 head, participants' mean head); 0 without a stored head."""
    have = [cid for cid in participants if cid in heads]
    if not have:
        return {cid: 0.0 for cid in participants}
    mean = torch.stack([heads[c].to(torch.float64) for c in have]).mean(dim=0)
    return {cid: cosine(heads[cid], mean) if cid in heads else 0.0 for cid in participants}


# ------------------------------------------------------------ update_sketch proxy
class CountSketch:
    """A fixed random count sketch R^p -> R^k: coordinate i goes to bucket b(i) with sign s(i).

    Linear and unbiased for inner products (E[<Sa, Sb>] = <a, b>), so a cosine of
    sketches estimates the cosine of the updates while the server keeps k floats
    instead of p. The hash is drawn from ``seed`` (regenerated, never stored).
    """

    def __init__(self, length: int, dim: int, seed: int) -> None:
        if length < 1 or dim < 1:
            raise ValueError(f"count sketch needs length >= 1 and dim >= 1, got length={length}, dim={dim}")
        g = torch.Generator().manual_seed(seed % (2**63 - 1))
        self.length, self.dim = length, dim
        self.bucket = torch.randint(0, dim, (length,), generator=g)
        self.sign = torch.randint(0, 2, (length,), generator=g).to(torch.float64) * 2.0 - 1.0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(-1).to(torch.float64)
        if v.numel() != self.length:
            raise ValueError(f"count sketch built for length {self.length}, got a vector of {v.numel()}")
        return torch.zeros(self.dim, dtype=torch.float64).index_add_(0, self.bucket, self.sign * v)


def loo_sketch_scores(
    sketches: Mapping[int, Sequence[torch.Tensor]], weights: Mapping[int, float]
) -> dict[int, list[float]]:
    """Leave-one-out conflict scores of one round's participants, for every exit prefix.

    ``sketches[c][s]``: the sketch of client c's update of stage s (0..m-2).
    For client c and prefix e (stages 0..e), the score is the cosine between
    c's prefix sketch and the weighted sum of the *other* participants' prefix
    sketches: sum_j n_j S_j - n_c S_c (linearity of the sketch). A client alone
    in its round has no reference and gets no score ({}).
    """
    ids = sorted(sketches)
    if len(ids) < 2:
        return {}
    stages = len(sketches[ids[0]])
    total = [sum(weights[c] * sketches[c][s] for c in ids) for s in range(stages)]
    out: dict[int, list[float]] = {}
    for c in ids:
        own = [sketches[c][s] for s in range(stages)]
        ref = [total[s] - weights[c] * own[s] for s in range(stages)]
        out[c] = [cosine(torch.cat(own[: e + 1]), torch.cat(ref[: e + 1])) for e in range(stages)]
    return out
