"""Rounds cost O(participants): sampling, availability, evaluation choice and setup at huge N."""

from __future__ import annotations

import numpy as np
import pytest

from cafe_ray.config import DataConfig, PartitionConfig
from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.data.base import ClientSplits
from cafe_ray.runs import rundir
from cafe_ray.sim import profiles as profiles_mod
from cafe_ray.sim import seeds
from cafe_ray.sim.engine import _sequential_factory
from cafe_ray.sim.profiles import CATALOGS, ClientClasses, ProfileTable
from cafe_ray.sim.simulation import Simulation, eval_clients, sample_participants
from tests.sim.conftest import tiny_cfg


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


def test_sampling_a_million_clients_does_no_per_client_python(tmp_path, monkeypatch):
    n = 1_000_000
    table = ProfileTable(CATALOGS["iot_mix"], n, seed=0)  # availability 0.8 / 0.9 / 0.95: coins needed
    cfg = tiny_cfg(tmp_path, f"data.num_clients={n}", "round.fraction=0.0001", "profiles.catalog=iot_mix")
    derive = _Counter(seeds.derive_seed)
    online = _Counter(profiles_mod.DeviceProfile.is_online)
    getitem = _Counter(ProfileTable.__getitem__)
    monkeypatch.setattr(seeds, "derive_seed", derive)
    monkeypatch.setattr(profiles_mod.DeviceProfile, "is_online", online)
    monkeypatch.setattr(ProfileTable, "__getitem__", getitem)
    picked = [sample_participants(table, cfg, t, virtual_time=0.0) for t in range(3)]
    # per round: one key for the availability coins, one for the sampling RNG; nothing per client
    assert derive.calls == 2 * 3
    assert online.calls == 0 and getitem.calls == 0
    for p in picked:
        assert len(p) == len(set(p)) and p == sorted(p) and p[0] >= 0 and p[-1] < n
        assert 80 <= len(p) <= 100  # ceil(1e-4 x ~870k online)
    assert picked[0] != picked[1]
    # what the draws promise: the same participants again, and availability near the profile's
    assert sample_participants(table, cfg, 0, 0.0) == picked[0]
    on = table.online(0.0, cfg.seed, 0)
    phones = table.tier_of == 0
    assert abs(np.isin(np.flatnonzero(phones), on).mean() - 0.8) < 0.01


def test_a_clients_coin_depends_on_seed_round_client_not_on_n():
    small = seeds.uniforms(3, 7, seeds.AVAIL, np.arange(1000))
    big = seeds.uniforms(3, 7, seeds.AVAIL, np.arange(1_000_000))
    assert np.array_equal(small, big[:1000])
    assert np.array_equal(seeds.uniforms(3, 7, seeds.AVAIL, np.array([999, 5])), small[[999, 5]])
    assert not np.array_equal(small, seeds.uniforms(3, 8, seeds.AVAIL, np.arange(1000)))
    assert not np.array_equal(small, seeds.uniforms(4, 7, seeds.AVAIL, np.arange(1000)))
    assert big.min() >= 0.0 and big.max() < 1.0 and abs(big.mean() - 0.5) < 0.002


def test_always_online_catalog_draws_no_coins(monkeypatch):
    table = ProfileTable(CATALOGS["uniform"], 1_000_000, seed=0)
    monkeypatch.setattr(seeds, "uniforms", lambda *a: pytest.fail("no coin needed when all are online"))
    assert table.online(0.0, 0, 0) is None
    classes = ClientClasses(table)
    assert classes.get(999_999) == "default" and classes.get(1_000_000) is None


def test_eval_clients_choices(tmp_path):
    parts = [1, 4]
    small = tiny_cfg(tmp_path, "data.num_clients=6")
    assert eval_clients(small, 0, parts) == ("all", range(6))  # auto at small N
    big = tiny_cfg(tmp_path, "data.num_clients=200000")
    scope, who = eval_clients(big, 3, parts)
    assert scope == "sample:1000" and len(who) == len(set(who)) == 1000 and max(who) < 200_000
    assert eval_clients(big, 3, parts) == (scope, who)  # same clients for every algorithm
    assert eval_clients(big, 4, parts)[1] != who
    k = tiny_cfg(tmp_path, "data.num_clients=50", "round.eval_clients=sample:5")
    assert eval_clients(k, 0, parts)[0] == "sample:5" and len(eval_clients(k, 0, parts)[1]) == 5
    assert eval_clients(tiny_cfg(tmp_path, "round.eval_clients=sample:99"), 0, parts) == ("all", range(6))
    assert eval_clients(tiny_cfg(tmp_path, "round.eval_clients=participants"), 0, parts) == ("participants", parts)


def test_vectorized_splits_at_many_clients():
    cfg = DataConfig(name="synthetic", num_clients=25_000, synthetic_samples=60_000, synthetic_shape=(1, 2, 2),
                     partition=PartitionConfig(kind="iid"), test_fraction=0.5, val_fraction=0.3)
    ds = load_dataset(cfg, seed=0)
    splits = partition_clients(ds, cfg, seed=0)
    assert isinstance(splits, ClientSplits) and len(splits) == 25_000
    train_val = np.concatenate([splits.train_idx, splits.val_idx])
    assert np.array_equal(np.sort(train_val), np.arange(60_000))  # disjoint cover of the train set
    assert splits.train_sizes().min() >= 1 and splits.test_sizes().min() >= 1
    for i in (0, 4_321, 24_999):
        s = splits[i]
        assert s.client_id == i and np.all(np.diff(s.train_idx) > 0) and np.all(np.diff(s.test_idx) > 0)
        assert set(ds.y_test[s.test_idx]) <= set(ds.y_train[np.concatenate([s.train_idx, s.val_idx])])
    again = partition_clients(ds, cfg, seed=0)
    assert np.array_equal(again.test_idx, splits.test_idx) and np.array_equal(again.val_idx, splits.val_idx)


def test_simulation_at_many_clients_runs_and_reads_back(tmp_path):
    n = 30_000
    cfg = tiny_cfg(tmp_path, "executor=sequential", f"data.num_clients={n}", "data.name=synthetic",
                   f"data.synthetic_samples={2 * n}", "data.synthetic_shape=[1, 8, 8]", "data.partition.kind=iid",
                   "round.fraction=0.0003", "round.num_rounds=2", "round.eval_every=1",
                   "round.eval_clients=sample:20", "checkpoint.every=1")
    sim = Simulation(cfg, tmp_path / "run", _sequential_factory)
    summary = sim.run()
    recs = rundir.read_jsonl(tmp_path / "run" / rundir.METRICS)
    assert [r["participants"] for r in recs] == [9, 9] and recs[-1]["eval_scope"] == "sample:20"
    assert recs[-1]["eval_clients"] == 20 and summary["num_clients"] == n
    assert len(rundir.load_splits(tmp_path / "run" / rundir.SPLITS)) == n
    assert len(rundir.read_profiles(tmp_path / "run")) == n


def _scale_cfg(tmp_path, n: int):
    """The same data (10^6 tiny samples) and 40 clients per round, at n registered clients."""
    return tiny_cfg(tmp_path, "data.name=synthetic", f"data.num_clients={n}", "data.synthetic_samples=1000000",
                    "data.synthetic_shape=[1, 4, 4]", "data.partition.kind=iid", "model.width=4",
                    "train.batch_size=2", "train.max_steps=1", f"round.fraction={40 / n}",
                    "round.num_rounds=10", "round.eval_every=10000", "checkpoint.every=10000")


def _steady_round_work(sim: Simulation, rounds: tuple[int, ...]) -> tuple[dict, int, int]:
    """(calls per cafe_ray function, peak bytes allocated, ray.put calls) over ``rounds``."""
    import cProfile
    import pstats
    import tracemalloc

    import ray

    puts = _Counter(ray.put)
    pr = cProfile.Profile()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        ray.put = puts
        pr.enable()
        for t in rounds:
            sim._round(t)
        pr.disable()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        ray.put = puts.fn
        tracemalloc.stop()
    calls = {k: v[1] for k, v in pstats.Stats(pr).stats.items() if "/cafe_ray/" in k[0]}
    return calls, peak, puts.calls


def _actor_chunk_work(sim: Simulation, t: int, store: str) -> tuple[dict, int]:
    """What a client actor does for one chunk of round t (ClientRunner.fit_many + packing), in
    this process: (calls per cafe_ray function, peak bytes allocated)."""
    import cProfile
    import pstats
    import tracemalloc

    from cafe_ray.algorithms import RoundContext
    from cafe_ray.sim.executor import pack_results
    from cafe_ray.sim.runner import ClientRunner, FitJob

    runner = ClientRunner(sim.cfg, sim.dataset, sim.splits, store)
    ids = sample_participants(sim.profiles, sim.cfg, t, 0.0)[:10]
    payloads = sim.algorithm.server_payloads(sim.state, RoundContext(t, 10, seeds.derive_seed(0, t), tuple(ids)))
    jobs = [FitJob(i, t, 10, seeds.derive_seed(0, t, i, seeds.TRAIN), None, payloads[i]) for i in ids]
    runner.fit_many(jobs[:2])  # first call: lazy imports and caches, not per-round work
    pr = cProfile.Profile()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pr.enable()
        pack_results(runner.fit_many(jobs))
        pr.disable()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return {k: v[1] for k, v in pstats.Stats(pr).stats.items() if "/cafe_ray/" in k[0]}, peak


@pytest.mark.slow  # runs at 1,000 and 1,000,000 registered clients
@pytest.mark.usefixtures("ray_session")
def test_ray_rounds_do_the_same_work_at_a_thousand_and_a_million_clients(tmp_path):
    """The Ray path's steady round does no O(registered) work: at 10^6 registered clients the
    coordinator makes exactly the calls it makes at 10^3 and allocates no more (an O(N) array
    would be 1-8 MB), puts only the round's payload in the object store (the data stays put
    once), and a client actor's chunk makes the same calls without allocating more."""
    import time

    import ray

    from cafe_ray.sim.engine import _ray_factory

    work = {}
    for n in (1000, 1_000_000):
        while ray.available_resources().get("CPU", 0) < 2:  # the previous pools' actors are going away
            time.sleep(0.2)
        sim = Simulation(_scale_cfg(tmp_path / str(n), n), tmp_path / f"run{n}", _ray_factory)
        try:
            assert len(sim.splits) == n
            sim._round(0)  # the actors start: not a steady round
            work[n] = (*_steady_round_work(sim, (1, 2, 3)), *_actor_chunk_work(sim, 4, str(tmp_path / f"s{n}")))
        finally:
            sim.executor.shutdown()
    (calls_k, peak_k, puts_k, actor_k, apeak_k), (calls_m, peak_m, puts_m, actor_m, apeak_m) = work.values()
    assert calls_m == calls_k, {k: (calls_k.get(k), calls_m.get(k)) for k in calls_k.keys() | calls_m.keys()
                                if calls_k.get(k) != calls_m.get(k)}
    assert peak_m < peak_k + 512 * 1024, (peak_k, peak_m)
    assert puts_m == puts_k == 3  # one payload per round
    assert actor_m == actor_k
    assert apeak_m < apeak_k + 512 * 1024, (apeak_k, apeak_m)  # 10^3 clients hold more data each
