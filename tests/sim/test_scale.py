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
    def __init__(self, fn):  # noqa: ANN001
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):  # noqa: ANN002, ANN003, ANN204
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
