"""Small seeded sampling helpers shared by the loaders and the partitioners."""

from __future__ import annotations

import numpy as np


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder).

    Deterministic and exact (the result sums to ``total``); used wherever a
    real-valued share has to become a sample count without drifting.
    """
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    if total <= 0 or len(w) == 0:
        return np.zeros(len(w), dtype=np.int64)
    top = w.max()
    # rescale by the max first: tiny Dirichlet weights (~1e-300) would overflow total / sum
    w = w / top if np.isfinite(top) and top > 0 else np.ones(len(w))
    s = w.sum()
    quota = w * (total / s)
    out = np.floor(quota).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        out[np.argsort(-(quota - out), kind="stable")[:rest]] += 1
    return out


def stratified_subsample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n`` samples keeping each class's share (all indices if n >= len)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    _, inv = np.unique(labels, return_inverse=True)
    counts = np.bincount(inv)
    quota = apportion(counts, n)  # quota <= counts because n < len(labels)
    perm = rng.permutation(len(labels))
    grouped = perm[np.argsort(inv[perm], kind="stable")]  # by class, random within class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.concatenate([grouped[s : s + q] for s, q in zip(starts, quota, strict=True)])
    return np.sort(idx).astype(np.int64)
