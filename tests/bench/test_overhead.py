"""The overhead benchmark's floors: a share of the clients, and W bare loops at once."""

from __future__ import annotations

from cafe_ray.bench.overhead import (
    EngineTiming,
    OverheadResult,
    floor_loop,
    parallel_floor,
    workload,
)


def test_floor_loop_runs_a_share_of_the_clients_and_starts_the_clock_when_told(tmp_path):
    cfg = workload("synthetic", 6, 2, 1, 1, 8, None, str(tmp_path))
    full = floor_loop(cfg)
    calls: list[int] = []
    share = floor_loop(cfg, clients=[0, 3], ready=lambda: calls.append(1))
    assert calls == [1]
    assert len(full.acc_exit) == len(share.acc_exit) and full.loop_s > 0 and share.loop_s > 0


def test_parallel_floor_times_w_processes_and_feeds_the_steady_ratio(tmp_path):
    cfg = workload("synthetic", 6, 2, 1, 1, 8, None, str(tmp_path))
    secs = parallel_floor(cfg, 2)
    assert 0 < secs < 60
    res = OverheadResult("x", client_rounds=12, workers=2, per_round=6, parallel=[secs, 2 * secs])
    res.engine.append(EngineTiming(end_to_end_s=5.0, rounds_s=3.0, steady_s=secs, acc_exit=(0.5,), load=0.0))
    # the steady rounds (1 of 2) against the same share of the fastest parallel floor
    assert abs(res.steady_vs_parallel("min") - 2.0) < 1e-9
