"""Client splits for very many clients, built in a few numpy passes (no per-client Python).

:func:`cafe_ray.data.partition.partition_clients` switches here from
``VECTORIZED_MIN_CLIENTS`` registered clients on (iid partitions): the per-client
loops of the general path cost seconds per 10^5 clients, these cost milliseconds.

- train: exactly the iid partition of the general path (the same permutation cut
  into the same ``np.array_split`` pieces, each sorted);
- test: each client draws ``max(1, round(test_fraction * n_i))`` test samples whose
  labels follow its own training labels (a random subset of them), each from the
  test samples of that label (with replacement across clients, duplicates within a
  client removed), so the label mix matches like the general path's apportioning;
- val (``data.val_fraction``): a random ``round(val_fraction * n_i)`` of the
  client's training samples (at least one left to train on).
"""

from __future__ import annotations

import numpy as np

from cafe_ray.config import DataConfig
from cafe_ray.data.base import ArrayDataset, ClientSplits

VECTORIZED_MIN_CLIENTS = 20_000


def _ptr(sizes: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=ptr[1:])
    return ptr


def _random_rank(owner: np.ndarray, ptr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): positions grouped by owner in random order, and each one's rank in its group."""
    order = np.lexsort((rng.random(len(owner)), owner))
    rank = np.arange(len(owner), dtype=np.int64) - ptr[owner[order]]
    return order, rank


def iid_csr(n_samples: int, n_clients: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, flat): the general path's iid partition (same draws) as CSR arrays."""
    if n_clients > n_samples:
        raise ValueError(
            f"data.num_clients={n_clients} exceeds the {n_samples} training samples; every client "
            "needs at least one sample (lower data.num_clients or raise data.synthetic_samples)")
    perm = rng.permutation(n_samples)
    base, extra = divmod(n_samples, n_clients)
    sizes = np.full(n_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    ptr = _ptr(sizes)
    owner = np.repeat(np.arange(n_clients, dtype=np.int64), sizes)
    flat = perm[np.lexsort((perm, owner))].astype(np.int64)  # sorted within each client
    return ptr, flat


def partition_vectorized(ds: ArrayDataset, cfg: DataConfig, seed: int) -> ClientSplits:
    """``partition_clients`` for ``partition.kind: iid`` at large N, as :class:`ClientSplits`."""
    if cfg.partition.kind != "iid":
        raise ValueError(f"data.partition.kind={cfg.partition.kind!r}: the vectorized splitter handles iid only")
    train_rng, test_rng, val_rng = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence(seed % 2**64).spawn(3))
    y = np.asarray(ds.y_train, dtype=np.int64)
    yt = np.asarray(ds.y_test, dtype=np.int64)
    if len(yt) == 0:
        raise ValueError(f"dataset {ds.name!r} has an empty test split")
    n_clients = cfg.num_clients
    ptr, flat = iid_csr(len(y), n_clients, train_rng)
    sizes = np.diff(ptr)
    owner = np.repeat(np.arange(n_clients, dtype=np.int64), sizes)

    # test: m_i picks among the client's own labels, each mapped to a test sample of that label
    m = np.minimum(np.maximum(1, np.rint(cfg.test_fraction * sizes).astype(np.int64)), sizes)
    order, rank = _random_rank(owner, ptr, test_rng)
    picked = order[rank < m[owner[order]]]  # positions in flat, grouped by client
    labels = y[flat[picked]]
    k = int(max(labels.max(), yt.max())) + 1
    counts = np.bincount(yt, minlength=k)
    by_label = np.argsort(yt, kind="stable")
    starts = _ptr(counts)[:-1]
    u = test_rng.random(len(picked))
    has = counts[labels] > 0
    test_pick = np.where(has, by_label[starts[labels] + (u * np.maximum(counts[labels], 1)).astype(np.int64)],
                         (u * len(yt)).astype(np.int64))
    key = np.unique(owner[picked] * np.int64(len(yt)) + test_pick)  # sorted by client, then index
    test_owner, test_flat = np.divmod(key, np.int64(len(yt)))
    test_ptr = _ptr(np.bincount(test_owner, minlength=n_clients))

    val_fraction = float(getattr(cfg, "val_fraction", 0.0) or 0.0)
    if val_fraction <= 0:
        return ClientSplits(ptr, flat, test_ptr, test_flat)
    mv = np.where(sizes >= 2, np.minimum(np.maximum(1, np.rint(val_fraction * sizes).astype(np.int64)), sizes - 1), 0)
    order, rank = _random_rank(owner, ptr, val_rng)
    is_val = np.zeros(len(flat), dtype=bool)
    is_val[order[rank < mv[owner[order]]]] = True
    # flat is sorted within each client, so masking keeps both parts sorted
    return ClientSplits(_ptr(sizes - mv), flat[~is_val], test_ptr, test_flat, _ptr(mv), flat[is_val])
