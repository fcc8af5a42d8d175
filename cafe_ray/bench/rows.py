"""Benchmark results as rows a machine can read: one JSON object per row (``--json``).

Each ``cafe-ray bench`` command prints a table for people; with ``--json PATH`` it
also writes the same rows, ratios included, as JSON Lines (``-``: to stdout,
instead of the table). Timings are seconds, ``*_min`` / ``*_median`` over the
alternated repeats, ratios plain floats (1.5 means 1.5x).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cafe_ray.bench.memory import MemoryResult
from cafe_ray.bench.overhead import CohortResult, OverheadResult
from cafe_ray.bench.scale import ScaleResult
from cafe_ray.bench.startup import StartupResult


def _stats(name: str, xs: Sequence[float]) -> dict[str, float]:
    return {f"{name}_min": min(xs), f"{name}_median": statistics.median(xs)}


def overhead_rows(results: Sequence[OverheadResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "bench": "overhead", "workload": r.label, "client_rounds": r.client_rounds, "workers": r.workers,
            "floor_s_min": r.floor_min, "floor_s_median": r.floor_median, "ideal_floor_s": r.ideal_min,
            "parallel_floor_s_min": min(r.parallel) if r.parallel else None,
            "parallel_floor_s_median": statistics.median(r.parallel) if r.parallel else None,
            "max_acc_diff": r.max_acc_diff, "load": [x.load for pair in zip(r.engine, r.floor, strict=True) for x in pair],
        }
        for stat in ("min", "median"):
            row.update({
                f"engine_rounds_s_{stat}": r.engine_rounds(stat), f"engine_e2e_s_{stat}": r.engine_e2e(stat),
                f"engine_vs_ideal_{stat}": r.ratio(stat), f"steady_vs_ideal_{stat}": r.steady_ratio(stat),
                f"steady_vs_parallel_{stat}": r.steady_vs_parallel(stat) if r.parallel else None,
                f"ms_per_client_round_above_ideal_{stat}": r.above_ideal_ms(stat),
            })
        row["floor_vs_engine_min"] = r.floor_min / r.engine_rounds("min")
        row["floor_vs_engine_median"] = r.floor_median / r.engine_rounds("median")
        rows.append(row)
    return rows


def cohort_rows(work: Sequence[tuple[str, int, Sequence[CohortResult]]]) -> list[dict[str, Any]]:
    """``work``: (workload, clients, its alternated plain/cohort pairs)."""
    rows = []
    for label, clients, res in work:
        p, c = [r.plain_s for r in res], [r.cohort_s for r in res]
        rows.append({"bench": "cohort", "workload": label, "clients": clients, **_stats("per_client_s", p),
                     **_stats("cohort_s", c), "speedup_min": min(p) / min(c),
                     "speedup_median": statistics.median(p) / statistics.median(c),
                     "max_param_diff": max(r.max_param_diff for r in res), "load": [r.load for r in res]})
    return rows


def scale_rows(res: Sequence[ScaleResult], small: int, big: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"bench": "scale", "registered": r.registered, "per_round": r.per_round, "setup_s": r.setup_s,
         "steady_round_s": r.steady_round_s, "round_s": list(r.round_times), "steady_cpu_s": r.steady_cpu_s,
         "peak_rss_mb": r.peak_rss_mb, "load": r.load} for r in res]
    for name, key in (("steady_round_time", lambda r: r.steady_round_s), ("steady_cpu", lambda r: r.steady_cpu_s)):
        s = [key(r) for r in res if r.registered == small and key(r) is not None]
        b = [key(r) for r in res if r.registered == big and key(r) is not None]
        if s and b:
            rows.append({"bench": "scale", "ratio": f"{name} {big} / {small} registered",
                         "min": min(b) / min(s), "median": statistics.median(b) / statistics.median(s)})
    return rows


def startup_rows(res: Sequence[StartupResult], config: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"bench": "startup", "config": config, "run": i + 1, "preload": r.preload, "import_s": r.import_s,
         "preflight_s": r.preflight_s, "ray_init_s": r.ray_init_s, "to_first_round_s": r.to_first_round_s,
         "total_s": r.total_s, "beyond_ray_init_s": r.beyond_ray_init_s, "load": r.load}
        for i, r in enumerate(res)]
    for p in sorted({r.preload for r in res}, reverse=True):
        mine = [r for r in res if r.preload == p]
        rows.append({"bench": "startup", "config": config, "preload": p, "summary": True,
                     **_stats("beyond_ray_init_s", [r.beyond_ray_init_s for r in mine]),
                     **_stats("total_s", [r.total_s for r in mine])})
    return rows


def memory_rows(res: Sequence[MemoryResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"bench": "memory", "registered": r.registered, "per_round": r.per_round,
                                   "peak_rss_mb": r.peak_rss_mb, "store_mb": r.store_mb} for r in res]
    if len(res) == 2:
        rows.append({"bench": "memory", "ratio": f"peak RSS {res[1].registered} / {res[0].registered} registered",
                     "value": res[1].peak_rss_mb / res[0].peak_rss_mb})
    return rows


def write_rows(rows: Sequence[dict[str, Any]], path: Path | None) -> bool:
    """Write ``rows`` as JSON Lines to ``path`` (``-``: stdout); True when they went to stdout,
    so the caller leaves the table out and stdout stays machine-readable."""
    if path is None:
        return False
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows)
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return False
