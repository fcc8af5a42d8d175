"""Latency-SLO control of early exits: pure, deterministic, no Ray, no torch, no clock.

Each client model has an accuracy-versus-MACs curve measured on its validation split, full
depth first. By default every client's curve follows one shared ladder of thresholds, the front
of all clients' validation scores pooled (:func:`pooled_ladder`, :func:`ladder_curve`): a client's
own split is small, and a front picked on it alone is noisy (on held-out halves of the val splits
its points were 0.5-0.7 points less accurate than one pooled threshold at the same MACs). Each
client still gets its own MACs, reach and accuracy on that ladder, and its ladder ends early
where its own split is clearly below the floor. :func:`threshold_curve` picks a
client's own front instead (``slo_curve: client``). An
:class:`SloController` per (client, latency target) holds an operating point on that curve and
moves it from what it is shown: the latency of the replica's requests with its target, every
client's (queueing delay + service time, as the replica measured them; the clients share the
replica's CPU and queue) and a :class:`ServiceModel` of the replica's per-exit service time.
When the recent p99 nears the target it moves to the most accurate point predicted to fit; when
the p99 stays well under it for a while it moves back toward full depth. It never goes past the
cheapest point allowed by the accuracy floor (``max_accuracy_drop`` of full depth's validation
accuracy). Apparate (OSDI'24) adapts one global model's exits this way; here every personal
model has its own curve and its own controller.

The prediction behind a move: queueing delay drains at the rate requests are served, so at
point j it scales with the per-request service time ``s_j / s_i`` of the current point i, and
the request's own service time is the model's estimate at j. Every method takes ``now``
(seconds) as an argument: a test drives a controller with a synthetic trace and gets the same
moves every time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21)) + (0.99, 0.995, 0.999)


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold on a client's validation curve (``threshold`` None: full depth)."""

    threshold: float | None
    accuracy: float  # on the client's val split
    macs: float  # mean cascade MACs per sample
    reach: tuple[float, ...]  # fraction of samples that run stage k (reach[0] == 1)

    def describe(self) -> dict[str, float | None]:
        return {"threshold": self.threshold, "val_accuracy": self.accuracy, "macs_per_sample": self.macs}


def _scores(max_prob: np.ndarray, correct: np.ndarray, cascade: Sequence[int]) -> tuple[np.ndarray, ...]:
    mp, ok = np.asarray(max_prob, dtype=np.float64), np.asarray(correct, dtype=bool)
    if mp.ndim != 2 or mp.shape != ok.shape or mp.shape[0] == 0:
        raise ValueError(f"max_prob and correct must be the same (N>0, num_exits) shape, got {mp.shape}, {ok.shape}")
    cost = np.asarray(cascade, dtype=np.float64)
    if cost.shape != (mp.shape[1],):
        raise ValueError(f"cascade has {cost.size} exits, the scores {mp.shape[1]}")
    return mp, ok, cost


def _exits(mp: np.ndarray, threshold: float | None) -> np.ndarray:
    """The exit each sample leaves at under ``threshold`` (None: full depth)."""
    m = mp.shape[1]
    if threshold is None:
        return np.full(mp.shape[0], m - 1)
    hit = mp[:, :-1] >= threshold
    return np.where(hit.any(axis=1), hit.argmax(axis=1), m - 1)


def curve_point(max_prob: np.ndarray, correct: np.ndarray, cascade: Sequence[int], threshold: float | None,
                ) -> OperatingPoint:
    """What the ``threshold`` policy (None: full depth) gives on scored samples: a sample leaves at
    the first exit whose max probability reaches the threshold (as in
    :func:`~cafe_ray.inference.predict_batch`), else at the last. ``max_prob`` (N, m): each sample's
    max softmax probability at every exit; ``correct`` (N, m): whether exit k's answer is right;
    ``cascade`` (m,): MACs of an answer at exit k."""
    mp, ok, cost = _scores(max_prob, correct, cascade)
    n, m = mp.shape
    exits = _exits(mp, threshold)
    reach = tuple(float((exits >= k).mean()) for k in range(m))
    return OperatingPoint(threshold, float(ok[np.arange(n), exits].mean()), float(cost[exits].mean()), reach)


def threshold_curve(max_prob: np.ndarray, correct: np.ndarray, cascade: Sequence[int],
                    thresholds: Sequence[float] = DEFAULT_GRID, max_accuracy_drop: float = 0.01,
                    ) -> list[OperatingPoint]:
    """The usable operating points, full depth first, then the thresholds (:func:`curve_point`)
    cheaper than it, each cheaper and less accurate than the one before (dominated thresholds
    dropped), none below full depth's accuracy - ``max_accuracy_drop`` (a fraction).

    Full depth stays first even where a threshold scores as well on the client's val split:
    that split is small (a few hundred samples), and the point a controller returns to when the
    load allows is the model's full answer, not a threshold that only looked as good there."""
    _scores(max_prob, correct, cascade)
    if not 0 <= max_accuracy_drop <= 1:
        raise ValueError(f"max_accuracy_drop is a fraction in [0, 1], got {max_accuracy_drop}")
    full = curve_point(max_prob, correct, cascade, None)
    floor = full.accuracy - max_accuracy_drop - 1e-12
    pts = [p for p in (curve_point(max_prob, correct, cascade, t) for t in sorted(set(thresholds)))
           if p.accuracy >= floor and p.macs < full.macs]
    front: list[OperatingPoint] = []
    for p in sorted(pts, key=lambda p: (p.macs, -p.accuracy)):  # cheapest first
        if not front or p.accuracy > front[-1].accuracy + 1e-12:  # else a cheaper point is as accurate
            front.append(p)
    return [full, *front[::-1]]


def pooled_ladder(scores: Sequence[tuple[np.ndarray, np.ndarray]], cascade: Sequence[int],
                  thresholds: Sequence[float] = DEFAULT_GRID, max_accuracy_drop: float = 0.01,
                  ) -> list[float | None]:
    """The thresholds every client's curve follows, full depth (None) first: the front of
    :func:`threshold_curve` on all clients' ``(max_prob, correct)`` val scores pooled.

    One threshold chosen on every client's samples is what a fixed-threshold server would pick;
    a controller that walks this ladder is, at any rung, that server (when all clients stand on
    the same rung), so it cannot be less accurate than it at the same MACs through noise in
    the clients' small val splits."""
    if not scores:
        raise ValueError("pooled_ladder needs the val scores of at least one client")
    mp = np.concatenate([np.asarray(s[0]) for s in scores])
    ok = np.concatenate([np.asarray(s[1]) for s in scores])
    return [p.threshold for p in threshold_curve(mp, ok, cascade, thresholds, max_accuracy_drop)]


def ladder_curve(max_prob: np.ndarray, correct: np.ndarray, cascade: Sequence[int],
                 ladder: Sequence[float | None], max_accuracy_drop: float = 0.01, margin_se: float = 2.0,
                 ) -> list[OperatingPoint]:
    """One client's operating points along a shared ``ladder`` (:func:`pooled_ladder`, whose floor
    is the pooled one): full depth first, then each rung on the client's own val scores.

    The ladder ends early for this client only where its own split shows the rung clearly below
    the floor: the paired accuracy drop from full depth, less ``margin_se`` standard errors, above
    ``max_accuracy_drop`` (the first such rung ends it). A client's split is a few hundred
    samples (a paired 1-point drop on 250 has a standard error of 0.6 points or more), so a per-client
    floor would end ladders on noise, and clients ending on different rungs run a mix of
    thresholds that is less accurate than one threshold at the same MACs. A rung that costs the
    client as many MACs as the one before (its samples leave at the same exits) is skipped."""
    mp, ok, _ = _scores(max_prob, correct, cascade)
    if not 0 <= max_accuracy_drop <= 1:
        raise ValueError(f"max_accuracy_drop is a fraction in [0, 1], got {max_accuracy_drop}")
    if not ladder or ladder[0] is not None:
        raise ValueError("a ladder starts with full depth (None)")
    n = mp.shape[0]
    full = curve_point(mp, ok, cascade, None)
    out = [full]
    for t in ladder[1:]:
        if t is None:
            raise ValueError("a ladder holds full depth (None) only at its top")
        p = curve_point(mp, ok, cascade, t)
        diff = ok[:, -1].astype(np.float64) - ok[np.arange(n), _exits(mp, t)]  # paired: full depth vs this rung
        se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        if float(diff.mean()) - margin_se * se > max_accuracy_drop + 1e-12:
            break
        if p.macs < out[-1].macs:
            out.append(p)
    return out


class ServiceModel:
    """Service time of one model call as ``a + sum_k c_k * n_k``: ``n_k`` samples ran stage k (and
    its exit head), ``a`` the per-call overhead. Fit by exponentially forgotten ridge regression
    toward a prior: ``stage_s`` (seconds per sample of each stage, as timed once by the replica,
    or MACs times any rate: only ratios matter until calls are observed). While the controller
    sits at one point the calls show one mix of stages only; the prior settles what they cannot."""

    def __init__(self, stage_s: Sequence[float], overhead_s: float = 0.0, forget: float = 0.995,
                 ridge: float = 1e-2) -> None:
        self.prior = np.concatenate([[overhead_s], np.asarray(stage_s, dtype=np.float64)])
        if self.prior.ndim != 1 or self.prior.size < 2 or (self.prior < 0).any():
            raise ValueError(f"stage_s: one non-negative cost per stage, got {list(stage_s)}")
        m = self.prior.size - 1
        self.forget, self.ridge = forget, ridge
        self._a = np.zeros((m + 1, m + 1))
        self._b = np.zeros(m + 1)
        self._time, self._work = 0.0, 0.0  # forgotten sums of seconds and of the prior's seconds
        self.calls = 0
        self._theta: np.ndarray | None = None

    def observe(self, ran: Sequence[float], seconds: float) -> None:
        """One model call: ``ran[k]`` samples ran stage k; it took ``seconds``."""
        x = np.concatenate([[1.0], np.asarray(ran, dtype=np.float64)])
        f = self.forget
        self._a = f * self._a + np.outer(x, x)
        self._b = f * self._b + x * seconds
        self._time = f * self._time + seconds
        self._work = f * self._work + float(x @ self.prior)
        self.calls += 1
        self._theta = None

    @property
    def coef(self) -> np.ndarray:
        """(1 + m,): per-call seconds, then seconds per sample of each stage (never negative)."""
        if self._theta is None:
            prior = self.prior * (self._time / self._work if self._work > 0 else 1.0)  # rescaled to the calls
            reg = np.diag(self.ridge * (np.diag(self._a) + 1e-9))  # relative: each coefficient on its own scale
            self._theta = np.maximum(np.linalg.solve(self._a + reg, self._b + reg @ prior), 0.0)
        return self._theta

    def per_sample(self, point: OperatingPoint) -> float:
        """Expected seconds per sample at ``point`` (stages weighted by how many samples reach them)."""
        return float(self.coef[1:] @ np.asarray(point.reach))

    def call(self, point: OperatingPoint, samples: float) -> float:
        """Expected seconds of one call of ``samples`` samples at ``point``."""
        return float(self.coef[0] + samples * self.per_sample(point))


@dataclass(frozen=True)
class SloSettings:
    """The controller's knobs (fractions of the latency target, seconds)."""

    high: float = 0.9  # p99 above high * target: move to a cheaper point now
    aim: float = 0.8  # a move picks the most accurate point predicted under aim * target
    low: float = 0.5  # p99 under low * target for `hold_s`: one step back even if none is predicted to fit
    window_s: float = 2.0  # latencies this recent make the p99
    min_requests: int = 8  # fewer in the window: light load, only moves back up (see update)
    interval_s: float = 0.25  # at most one decision per interval
    hold_s: float = 1.0  # how long a more accurate point must look affordable before moving back up
    settle_s: float = 0.5  # after a move, latencies older than this many seconds are forgotten


class SloController:
    """Moves one client's operating point to keep its requests' p99 latency under ``target_s``."""

    def __init__(self, points: Sequence[OperatingPoint], target_s: float, service: ServiceModel,
                 settings: SloSettings | None = None) -> None:
        if not points:
            raise ValueError("an SLO controller needs at least one operating point (full depth)")
        if target_s <= 0:
            raise ValueError(f"latency target must be > 0 s, got {target_s}")
        self.points = list(points)
        self.target = float(target_s)
        self.service = service
        self.s = settings or SloSettings()
        self.index = 0  # full depth
        self._lat: deque[tuple[float, float, float, float]] = deque()  # (time, latency, queue, samples)
        self._next = -np.inf
        self._up_since: float | None = None
        self.moves = 0

    @property
    def point(self) -> OperatingPoint:
        return self.points[self.index]

    def observe(self, now: float, latency_s: float, queue_s: float, samples: int) -> None:
        """One request of this client answered at ``now``: total latency and its queueing part."""
        self._lat.append((now, latency_s, queue_s, float(samples)))

    def _recent(self, now: float) -> np.ndarray:
        while self._lat and self._lat[0][0] < now - self.s.window_s:
            self._lat.popleft()
        return np.array(self._lat, dtype=np.float64).reshape(-1, 4)

    def predict(self, j: int, p99: float, queue99: float, samples: float) -> float:
        """p99 latency expected at point ``j`` from the current point's: the queueing part scales
        with the service time (the queue drains at the rate requests are served), the model call
        is the service model's estimate at ``j``, and the rest (HTTP, encoding) stays as it is."""
        here = self.service.call(self.point, samples)
        there = self.service.call(self.points[j], samples)
        ratio = there / here if here > 0 else 1.0
        rest = max(p99 - queue99 - here, 0.0)
        return rest + queue99 * ratio + there

    def update(self, now: float) -> int:
        """Decide (at most once per ``interval_s``); returns the operating point's index.

        With fewer than ``min_requests`` recent requests the load is light: the controller only
        moves back toward full depth, to a point predicted to fit from the slowest of them (one
        step at a time when there are none: the client is idle)."""
        if now < self._next:
            return self.index
        rec = self._recent(now)
        if rec.shape[0] < self.s.min_requests and self.index == 0:
            return self.index  # light load at full depth: nothing to decide, no interval spent
        self._next = now + self.s.interval_s
        t = self.target
        if rec.shape[0] < self.s.min_requests:
            if rec.shape[0] == 0:
                self._hold_then_move(now, self.index - 1)
                return self.index
            worst, queue, n = float(rec[:, 1].max()), float(rec[:, 2].max()), float(rec[:, 3].mean())
            up = [j for j in range(self.index) if self.predict(j, worst, queue, n) <= self.s.aim * t]
            if up:
                self._hold_then_move(now, up[0])
            else:
                self._up_since = None
            return self.index
        p99 = float(np.percentile(rec[:, 1], 99))
        q99 = float(np.percentile(rec[:, 2], 99))
        n = float(rec[:, 3].mean())
        if p99 > self.s.high * t:
            self._up_since = None
            down = [j for j in range(self.index + 1, len(self.points))
                    if self.predict(j, p99, q99, n) <= self.s.aim * t]
            self._move(now, down[0] if down else len(self.points) - 1)
            return self.index
        up = [j for j in range(self.index) if self.predict(j, p99, q99, n) <= self.s.aim * t]
        if up or (self.index > 0 and p99 < self.s.low * t):
            self._hold_then_move(now, up[0] if up else self.index - 1)
        else:
            self._up_since = None
        return self.index

    def _hold_then_move(self, now: float, j: int) -> None:
        """Move back up to ``j`` once a move up has looked right for ``hold_s``."""
        self._up_since = now if self._up_since is None else self._up_since
        if now - self._up_since >= self.s.hold_s:
            self._move(now, j)
            self._up_since = None

    def _move(self, now: float, j: int) -> None:
        if j == self.index:
            return
        self.index = j
        self.moves += 1
        cut = now - self.s.settle_s  # what was measured at the old point says little about the new one
        self._lat = deque(r for r in self._lat if r[0] >= cut)
