"""Partitioners: coverage, skew vs alpha, determinism, termination, shards, test splits."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from cafe_ray.config import DataConfig, PartitionConfig
from cafe_ray.data import ArrayDataset, partition_clients
from cafe_ray.data.partition import dirichlet_partition, iid_partition, shards_partition
from cafe_ray.data.sampling import apportion


def _labels(n: int = 2000, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n).astype(np.int64)


def _dataset(n: int = 2000, m: int = 600, k: int = 10) -> ArrayDataset:
    y, yt = _labels(n, k, 1), _labels(m, k, 2)
    return ArrayDataset("toy", np.zeros((n, 1, 2, 2), np.float32), y,
                        np.zeros((m, 1, 2, 2), np.float32), yt, k)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


def _mean_entropy(parts: list[np.ndarray], labels: np.ndarray, k: int) -> float:
    ents = []
    for p in parts:
        q = np.bincount(labels[p], minlength=k) / len(p)
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def test_iid_cover_and_balance() -> None:
    y = _labels(1003)
    parts = iid_partition(y, 10, np.random.default_rng(0))
    _assert_disjoint_cover(parts, 1003)
    assert {len(p) for p in parts} <= {100, 101}


@pytest.mark.parametrize("alpha", [0.01, 0.3, 100.0])
def test_dirichlet_cover_and_min_size(alpha: float) -> None:
    y = _labels()
    parts = dirichlet_partition(y, 20, alpha, 15, np.random.default_rng(0))
    _assert_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 15


def test_dirichlet_skew_follows_alpha() -> None:
    y = _labels()
    ent = {a: _mean_entropy(dirichlet_partition(y, 20, a, 10, np.random.default_rng(0)), y, 10)
           for a in (0.05, 1.0, 100.0)}
    assert ent[0.05] < ent[1.0] < ent[100.0]
    assert ent[100.0] > 0.95 * np.log(10)  # near uniform
    assert ent[0.05] < 0.5 * np.log(10)  # strongly skewed


def test_dirichlet_terminates_many_clients_tiny_alpha() -> None:
    y = _labels(20000, 100, 7)
    t0 = time.perf_counter()
    parts = dirichlet_partition(y, 500, 0.05, 10, np.random.default_rng(0))
    assert time.perf_counter() - t0 < 5.0
    _assert_disjoint_cover(parts, 20000)
    assert len(parts) == 500 and min(len(p) for p in parts) >= 10


def test_dirichlet_lowers_infeasible_min_size() -> None:
    y = _labels(100)
    with pytest.warns(UserWarning, match="min_size=50 is infeasible"):
        parts = dirichlet_partition(y, 10, 0.1, 50, np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 10
    _assert_disjoint_cover(parts, 100)


def test_too_many_clients_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"data.num_clients=11 exceeds the 10"):
        dirichlet_partition(_labels(10), 11, 0.5, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"data.num_clients=11"):
        iid_partition(_labels(10), 11, np.random.default_rng(0))


def test_dirichlet_deterministic() -> None:
    y = _labels()
    a = dirichlet_partition(y, 10, 0.3, 5, np.random.default_rng(4))
    b = dirichlet_partition(y, 10, 0.3, 5, np.random.default_rng(4))
    c = dirichlet_partition(y, 10, 0.3, 5, np.random.default_rng(5))
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_at_most_k_labels(k: int) -> None:
    y = _labels(1000, 10)
    parts = shards_partition(y, 20, k, np.random.default_rng(0))
    _assert_disjoint_cover(parts, 1000)
    assert all(1 <= len(np.unique(y[p])) <= k for p in parts)


def test_shards_needs_a_shard_per_class() -> None:
    with pytest.raises(ValueError, match="shards_per_client=2"):
        shards_partition(_labels(1000, 100), 3, 2, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partition_clients_splits(kind: str) -> None:
    ds = _dataset()
    cfg = DataConfig(num_clients=8, test_fraction=0.25, partition=PartitionConfig(kind=kind))
    splits = partition_clients(ds, cfg, seed=3)
    assert [s.client_id for s in splits] == list(range(8))
    _assert_disjoint_cover([s.train_idx for s in splits], len(ds.y_train))
    for s in splits:
        assert len(np.unique(s.test_idx)) == len(s.test_idx) >= 1  # no repeats within a client
        assert abs(len(s.test_idx) - 0.25 * len(s.train_idx)) <= max(2, 0.05 * len(s.train_idx))
        assert set(ds.y_test[s.test_idx]) <= set(ds.y_train[s.train_idx])
    again = partition_clients(ds, cfg, seed=3)
    other = partition_clients(ds, cfg, seed=4)
    assert all(np.array_equal(a.test_idx, b.test_idx) for a, b in zip(splits, again, strict=True))
    assert not all(np.array_equal(a.train_idx, b.train_idx) for a, b in zip(splits, other, strict=True))


def test_test_split_follows_train_distribution() -> None:
    ds = _dataset(4000, 2000)
    cfg = DataConfig(num_clients=10, partition=PartitionConfig(kind="dirichlet", alpha=0.2))
    splits = partition_clients(ds, cfg, seed=0)
    tr = np.stack([np.bincount(ds.y_train[s.train_idx], minlength=10) for s in splits]).ravel()
    te = np.stack([np.bincount(ds.y_test[s.test_idx], minlength=10) for s in splits]).ravel()
    assert np.corrcoef(tr, te)[0, 1] > 0.98


def test_single_client_gets_everything() -> None:
    ds = _dataset(50, 20)
    splits = partition_clients(ds, DataConfig(num_clients=1), seed=0)
    assert len(splits[0].train_idx) == 50 and len(splits[0].test_idx) == 10


def test_apportion_exact_and_tiny_weights() -> None:
    assert apportion(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    tiny = np.array([1e-310, 3e-310, 0.0])  # subnormal Dirichlet draws: total / sum overflows
    assert apportion(tiny, 8).tolist() == [2, 6, 0]
    assert apportion(np.zeros(4), 6).sum() == 6


def test_dirichlet_random_settings_always_valid() -> None:
    """Random (n, classes, clients, alpha, min_size) including infeasible min sizes."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, k = int(rng.integers(10, 800)), int(rng.integers(1, 120))
        c = int(rng.integers(1, min(n, 200) + 1))
        alpha, ms = float(10 ** rng.uniform(-4, 3)), int(rng.integers(1, 60))
        y = rng.integers(0, k, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = dirichlet_partition(y, c, alpha, ms, np.random.default_rng(trial))
        _assert_disjoint_cover(parts, n)
        assert min(len(p) for p in parts) >= max(1, min(ms, n // c))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_val_split_disjoint_stratified_deterministic(kind: str) -> None:
    ds = _dataset()
    cfg = DataConfig(num_clients=8, partition=PartitionConfig(kind=kind, alpha=0.3), val_fraction=0.2)
    splits = partition_clients(ds, cfg, seed=3)
    again = partition_clients(ds, cfg, seed=3)
    no_val = partition_clients(ds, DataConfig(num_clients=8, partition=PartitionConfig(kind=kind, alpha=0.3)), seed=3)
    for s, s2, s0 in zip(splits, again, no_val, strict=True):
        assert np.array_equal(s.val_idx, s2.val_idx) and np.array_equal(s.train_idx, s2.train_idx)
        # carved from the client's own training data: train + val is the old train set
        assert not np.intersect1d(s.train_idx, s.val_idx).size
        assert np.array_equal(np.sort(np.concatenate([s.train_idx, s.val_idx])), np.sort(s0.train_idx))
        # test indices point into the test array and are the same as without a val split
        assert np.array_equal(s.test_idx, s0.test_idx)
        n = len(s0.train_idx)
        assert len(s.val_idx) == min(max(1, round(0.2 * n)), n - 1)
        # stratified: val holds only the client's own labels, in proportion
        y = ds.y_train
        own = set(np.unique(y[s0.train_idx]).tolist())
        assert set(np.unique(y[s.val_idx]).tolist()) <= own
        counts = np.bincount(y[s0.train_idx], minlength=10)
        vcounts = np.bincount(y[s.val_idx], minlength=10)
        assert np.all(np.abs(vcounts - counts * len(s.val_idx) / n) <= 1.0 + 1e-9)
    assert any(not np.array_equal(a.val_idx, b.val_idx)
               for a, b in zip(splits, partition_clients(ds, cfg, seed=4), strict=True))


def test_val_split_keeps_one_training_sample() -> None:
    from cafe_ray.data.partition import _val_split

    idx = np.array([5, 9], dtype=np.int64)
    train, val = _val_split(idx, np.array([1, 1]), 0.9, np.random.default_rng(0))
    assert len(train) == 1 and len(val) == 1
    train, val = _val_split(idx[:1], np.array([1]), 0.5, np.random.default_rng(0))
    assert list(train) == [5] and len(val) == 0
