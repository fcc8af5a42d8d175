"""Split a dataset over clients: IID, Dirichlet(alpha) label skew, pathological k-shards.

The low-level partitioners are pure functions of (labels, rng) returning one
index array per client, so they can be tested and reused without a dataset.
:func:`partition_clients` applies one to ``y_train`` and then draws each
client's test split from ``y_test`` following that client's own label mix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from cafe_ray.config import DataConfig
from cafe_ray.data.base import ArrayDataset, ClientSplit
from cafe_ray.data.sampling import apportion


def _check_clients(n_samples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"data.num_clients={n_clients}: need at least 1 client")
    if n_clients > n_samples:
        raise ValueError(
            f"data.num_clients={n_clients} exceeds the {n_samples} training samples; every client "
            "needs at least one sample (lower data.num_clients or data.max_train_samples)"
        )


def _by_class(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled sample indices of each class 0..max(label)."""
    k = int(labels.max()) + 1 if len(labels) else 0
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    return np.split(order, np.cumsum(np.bincount(labels, minlength=k))[:-1])


def iid_partition(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-size (within one) disjoint splits covering every sample."""
    labels = np.asarray(labels)
    _check_clients(len(labels), n_clients)
    parts = np.array_split(rng.permutation(len(labels)), n_clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, min_size: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skewed disjoint splits covering every sample; each client gets >= ``min_size``.

    Each client draws its label mix p_i ~ Dir(alpha); every class is then
    apportioned to clients in proportion to p_i[c] (a fixed amount of work, unlike
    the classic "redraw until every client has min_size" loop, which can spin
    forever for small alpha / many clients). A repair step finally moves samples
    from clients with a surplus to those below ``min_size``, preferring the
    classes the deficient client favours so the skew survives. If
    ``len(labels) < n_clients * min_size`` the minimum is lowered with a warning.
    Note alpha is per client over classes (Hsu et al. 2019): Dir(0.05) over 100
    classes still spreads a client over ~10 classes, over 10 classes ~1-2.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    _check_clients(n, n_clients)
    if alpha <= 0:
        raise ValueError(f"data.partition.alpha={alpha}: must be > 0")
    if n < n_clients * min_size:
        new = n // n_clients
        warnings.warn(
            f"data.partition.min_size={min_size} is infeasible for {n} samples over "
            f"{n_clients} clients; using min_size={new}", stacklevel=2)
        min_size = new
    min_size = max(min_size, 1)  # never leave a client empty
    groups = [g for g in _by_class(labels, rng) if len(g)]  # only classes present
    k = len(groups)
    p = rng.dirichlet(np.full(k, alpha), size=n_clients)
    bad = ~np.isfinite(p).all(axis=1)  # guard against degenerate draws for tiny alpha
    if bad.any():
        p[bad] = np.eye(k)[rng.integers(k, size=int(bad.sum()))]
    counts = np.zeros((n_clients, k), dtype=np.int64)
    for c, g in enumerate(groups):
        counts[:, c] = apportion(p[:, c], len(g))
    _repair(counts, p, min_size)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, g in enumerate(groups):
        for i, chunk in enumerate(np.split(g, np.cumsum(counts[:, c])[:-1])):
            if len(chunk):
                parts[i].append(chunk)
    return [np.sort(np.concatenate(ch)).astype(np.int64) if ch else np.zeros(0, np.int64)
            for ch in parts]


def _repair(counts: np.ndarray, p: np.ndarray, min_size: int) -> None:
    """Move samples (in place, per class) from surplus clients to those below ``min_size``.

    Terminates: the total is >= n_clients * min_size, so while a client is short
    some other client holds a surplus, and each step moves >= 1 sample.
    """
    sizes = counts.sum(axis=1)
    for i in np.flatnonzero(sizes < min_size):
        need = min_size - sizes[i]
        for c in np.argsort(-p[i], kind="stable"):  # the client's favourite classes first
            if need == 0:
                break
            surplus = np.minimum(counts[:, c], np.maximum(sizes - min_size, 0))
            surplus[i] = 0
            while need > 0 and surplus.any():
                j = int(np.argmax(surplus))
                take = int(min(need, surplus[j]))
                counts[j, c] -= take
                counts[i, c] += take
                sizes[j] -= take
                sizes[i] += take
                surplus[j] -= take
                need -= take
        if need:  # unreachable given the feasibility check; kept as a loud guard
            raise RuntimeError("dirichlet repair could not reach min_size")


def shards_partition(labels: np.ndarray, n_clients: int, shards_per_client: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al.): each client gets k label-pure shards.

    Shards never straddle a class boundary, so a client holds at most k labels;
    each class gets shards in proportion to its size (at least one), and all
    samples are used.
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = shards_per_client
    _check_clients(len(labels), n_clients)
    groups = [g for g in _by_class(labels, rng) if len(g)]
    total = n_clients * k
    if total < len(groups):
        raise ValueError(
            f"data.partition.shards_per_client={k} x data.num_clients={n_clients} = {total} shards "
            f"< {len(groups)} classes; every class needs a shard (raise shards_per_client or use "
            "partition.kind=dirichlet)")
    if total > len(labels):
        raise ValueError(
            f"data.partition.shards_per_client={k} x data.num_clients={n_clients} = {total} shards "
            f"exceeds the {len(labels)} training samples")
    sizes = np.array([len(g) for g in groups])
    per_class = np.ones(len(groups), dtype=np.int64) + apportion(sizes - 1, total - len(groups))
    per_class = np.minimum(per_class, sizes)
    while per_class.sum() < total:  # capped classes hand their shards to the roomiest ones
        room = np.where(per_class < sizes, sizes / per_class, 0)
        per_class[int(np.argmax(room))] += 1
    shards = [s for g, m in zip(groups, per_class, strict=True) for s in np.array_split(g, m)]
    order = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[s] for s in order[i * k:(i + 1) * k]])).astype(np.int64)
            for i in range(n_clients)]


def _test_split(y_train_client: np.ndarray, test_groups: list[np.ndarray], fraction: float,
                rng: np.random.Generator) -> np.ndarray:
    """Test indices mirroring the client's train label counts, ~fraction of its size, >= 1."""
    k = len(test_groups)
    train_counts = np.bincount(y_train_client, minlength=k)[:k].astype(np.float64)
    avail = np.array([len(g) for g in test_groups])
    m = min(max(1, round(fraction * len(y_train_client))), int(avail.sum()))
    weights = np.where(avail > 0, train_counts, 0)
    if weights.sum() == 0:  # none of the client's classes appear in the test set
        weights = avail.astype(np.float64)
    quota = np.minimum(apportion(weights, m), avail)
    while quota.sum() < m:  # a class ran out: top up the client's other classes, never new ones
        room = np.where((quota < avail) & (weights > 0), weights, 0)
        if not room.any():
            break  # smaller test split rather than labels the client never sees
        quota[int(np.argmax(room))] += 1
    picks = [rng.choice(test_groups[c], size=q, replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _val_split(idx: np.ndarray, y_client: np.ndarray, fraction: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): ~fraction of the client's samples, stratified by its own labels.

    Validation follows the client's label distribution (like its test split) and the
    client always keeps at least one training sample.
    """
    empty = np.empty(0, dtype=np.int64)
    if fraction <= 0 or len(idx) < 2:
        return idx, empty
    m = min(max(1, round(fraction * len(idx))), len(idx) - 1)
    counts = np.bincount(y_client)
    quota = np.minimum(apportion(counts, m), counts)
    picks = [rng.choice(idx[y_client == c], size=q, replace=False) for c, q in enumerate(quota) if q]
    val = np.sort(np.concatenate(picks)).astype(np.int64) if picks else empty
    return np.setdiff1d(idx, val, assume_unique=True).astype(np.int64), val


def partition_clients(ds: ArrayDataset, cfg: DataConfig, seed: int) -> Sequence[ClientSplit]:
    """Partition ``ds`` per ``cfg.partition`` into ``cfg.num_clients`` train/val/test splits.

    Test indices come from the dataset's test array and mirror the client's label
    counts; validation indices (``data.val_fraction``) are carved from the client's
    training data, so train, val and test never overlap.

    From ``VECTORIZED_MIN_CLIENTS`` clients on, iid partitions are built by
    :mod:`cafe_ray.data.vectorized` in a few numpy passes (a million clients in seconds).
    """
    from cafe_ray.data.vectorized import VECTORIZED_MIN_CLIENTS, partition_vectorized

    if ds.train_client is not None:
        return natural_partition(ds, cfg, seed)
    if cfg.partition.kind == "iid" and cfg.num_clients >= VECTORIZED_MIN_CLIENTS:
        return partition_vectorized(ds, cfg, seed)
    pc = cfg.partition
    # SeedSequence children do not depend on how many are spawned: adding the val
    # stream leaves the train and test draws of earlier versions unchanged
    train_rng, test_rng, val_rng = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence(seed % 2**64).spawn(3))
    y = np.asarray(ds.y_train, dtype=np.int64)
    if pc.kind == "iid":
        parts = iid_partition(y, cfg.num_clients, train_rng)
    elif pc.kind == "dirichlet":
        parts = dirichlet_partition(y, cfg.num_clients, pc.alpha, pc.min_size, train_rng)
    elif pc.kind == "shards":
        parts = shards_partition(y, cfg.num_clients, pc.shards_per_client, train_rng)
    else:  # pragma: no cover - the config Literal forbids it
        raise ValueError(f"data.partition.kind={pc.kind!r}: use iid, dirichlet or shards")
    if len(ds.y_test) == 0:
        raise ValueError(f"dataset {ds.name!r} has an empty test split")
    k = max(ds.num_classes, int(y.max()) + 1, int(ds.y_test.max()) + 1)
    yt = np.asarray(ds.y_test, dtype=np.int64)
    test_groups = [np.flatnonzero(yt == c) for c in range(k)]
    tests = [_test_split(y[idx], test_groups, cfg.test_fraction, test_rng) for idx in parts]
    return _with_val(parts, tests, y, cfg, val_rng)


def _with_val(parts: list[np.ndarray], tests: list[np.ndarray], y: np.ndarray, cfg: DataConfig,
              val_rng: np.random.Generator) -> list[ClientSplit]:
    """One split per client, its validation rows (``data.val_fraction``) carved from its training rows."""
    out = []
    for i, (idx, test) in enumerate(zip(parts, tests, strict=True)):
        if cfg.val_fraction > 0:
            srt = np.sort(idx).astype(np.int64)
            train, val = _val_split(srt, y[srt], cfg.val_fraction, val_rng)
            out.append(ClientSplit(i, train, test, val))
        else:
            out.append(ClientSplit(i, idx, test))
    return out


def _groups(ids: np.ndarray, n: int) -> list[np.ndarray]:
    """Sorted row indices of each group 0..n-1."""
    order = np.argsort(ids, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(np.bincount(ids, minlength=n))[:-1])


def natural_partition(ds: ArrayDataset, cfg: DataConfig, seed: int) -> list[ClientSplit]:
    """One client per value of the dataset's own client column (``data.client``, e.g. a writer).

    The loader has mapped the values to 0..n-1 and held out each client's test rows
    already; ``data.partition`` is not used, ``data.val_fraction`` is.
    """
    if ds.train_client is None or ds.test_client is None:
        raise ValueError("natural_partition needs a dataset with a client column (data.client)")
    n = int(ds.train_client.max()) + 1 if len(ds.train_client) else 0
    if "num_clients" in cfg.model_fields_set and cfg.num_clients != n:  # else it follows the column
        raise ValueError(f"data.num_clients={cfg.num_clients}: data.client={cfg.client} holds {n} clients "
                         "after the split; omit data.num_clients")
    val_rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64).spawn(3)[2])
    y = np.asarray(ds.y_train, dtype=np.int64)
    return _with_val(_groups(ds.train_client, n), _groups(ds.test_client, n), y, cfg, val_rng)
