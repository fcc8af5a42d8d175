"""What a replica has served: request counts, latency percentiles, MACs and implied accuracy.

Pure and thread-safe (the model call records from a worker thread, the event loop reads); the
``GET /v1/stats`` answer is :meth:`ServeStats.snapshot`. Latency percentiles are over a window
of the most recent requests (per client and overall), counts since the replica started.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW = 4096  # recent requests kept per client (and overall) for the percentiles


@dataclass
class _Series:
    requests: int = 0
    samples: int = 0
    # (latency s, queueing s, samples, MACs summed over the samples, implied accuracy or NaN)
    recent: deque[tuple[float, float, int, float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, latency: float, queue: float, samples: int, macs: float, accuracy: float | None) -> None:
        self.requests += 1
        self.samples += samples
        self.recent.append((latency, queue, samples, macs, np.nan if accuracy is None else accuracy))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "samples": self.samples, "p50_ms": None, "p95_ms": None,
                               "p99_ms": None, "queue_p99_ms": None, "mean_macs": None, "implied_accuracy": None}
        if not self.recent:
            return out
        r = np.array(self.recent, dtype=np.float64)
        lat = r[:, 0] * 1e3
        out.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                   p99_ms=float(np.percentile(lat, 99)), queue_p99_ms=float(np.percentile(r[:, 1] * 1e3, 99)),
                   mean_macs=float(r[:, 3].sum() / r[:, 2].sum()))
        known = ~np.isnan(r[:, 4])
        if known.any():
            out["implied_accuracy"] = float((r[known, 4] * r[known, 2]).sum() / r[known, 2].sum())
        return out


class ServeStats:
    """Per client and overall: what :class:`~cafe_ray.serve.schemas.StatsResponse` reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._overall = _Series()
        self._clients: dict[int, _Series] = {}

    def record(self, client_id: int, latency_s: float, queue_s: float, samples: int, macs: float,
               accuracy: float | None = None) -> None:
        """One answered request: its latency and queueing delay (seconds), its samples, the MACs
        they ran in total, and the validation accuracy its operating point implies (if known)."""
        with self._lock:
            self._overall.add(latency_s, queue_s, samples, macs, accuracy)
            self._clients.setdefault(client_id, _Series()).add(latency_s, queue_s, samples, macs, accuracy)

    @staticmethod
    def empty() -> dict[str, Any]:
        """The summary of a client with no request answered yet."""
        return _Series().summary()

    def snapshot(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """(overall summary, {client: summary})."""
        with self._lock:
            return self._overall.summary(), {c: s.summary() for c, s in sorted(self._clients.items())}
