"""Teacher weights and aggregated teacher heads of CAFEDistill (arXiv:2601.10015), steps 4-5.

With h_j the latest uploaded last-exit head of client j (weight and bias
flattened, :func:`pack_head`) and D_ij = 1 - cos(h_i, h_j), every client i solves

    w_i = argmin_{w in simplex}  sum_j w_ij D_ij + mu ||w||^2
        = proj_simplex(-D_i / (2 mu))

(complete the square: the objective is mu ||w + D_i/(2mu)||^2 + const). mu -> 0
puts all weight on the client's own head (D_ii = 0), large mu spreads it
uniformly. Because a teacher logit is linear in the shared feature,
phi(x)^T hbar_i = sum_j w_ij phi(x)^T h_j for hbar_i = sum_j w_ij h_j, so the server
sends one head per client instead of n (the client-decoupled formulation).

Numerics are float64 numpy; the server has the heads, not the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of a vector onto the probability simplex (exact, O(n log n)).

    The sort-based algorithm of Held et al. (1974) / Duchi et al. (ICML 2008):
    w = max(v - theta, 0) with the threshold theta that makes w sum to 1.
    """
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"project_simplex needs a non-empty 1-D vector, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("project_simplex: the vector has NaN or infinite entries")
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - css / ind > 0)[0][-1])  # last index still above the threshold
    theta = css[rho] / (rho + 1)
    return np.maximum(v - theta, 0.0)


def _check_heads(H: np.ndarray) -> np.ndarray:
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty (n_pool, p) matrix of flattened heads, got shape {H.shape}")
    return H


def _rows(rows: Sequence[int] | None, n: int) -> np.ndarray:
    idx = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"rows must index the pool [0, {n - 1}], got {list(idx)}")
    return idx


def cosine_distances(
    H: np.ndarray, rows: Sequence[int] | None = None, center: np.ndarray | None = None
) -> np.ndarray:
    """D_ij = 1 - cos(h_i - c, h_j - c) for i in ``rows`` (default: all), j over the pool.

    ``center`` c (default 0) is the shared initial head under ``center_heads``:
    without it the common initial weights dominate every cosine and D_ij lives
    in a narrow band. A zero head has cosine 0 to every other head; D_ii is 0 by
    definition (a head is its own closest teacher even when it is degenerate).
    """
    H = _check_heads(H)
    if center is not None:
        c = np.asarray(center, dtype=np.float64)
        if c.shape != (H.shape[1],):
            raise ValueError(f"center must be a ({H.shape[1]},) head vector, got shape {c.shape}")
        H = H - c[None, :]
    idx = _rows(rows, H.shape[0])
    norms = np.linalg.norm(H, axis=1)
    Hn = H / np.where(norms > 0, norms, 1.0)[:, None]  # zero rows stay zero: cos = 0
    D = 1.0 - Hn[idx] @ Hn.T  # (len(rows), n_pool)
    D[np.arange(idx.size), idx] = 0.0
    return np.clip(D, 0.0, 2.0)


def teacher_weights(
    H: np.ndarray, mu: float, rows: Sequence[int] | None = None, center: np.ndarray | None = None
) -> np.ndarray:
    """W with rows w_i = proj_simplex(-D_i / (2 mu)), for i in ``rows`` (default: the pool).

    H: (n_pool, p) flattened last-exit heads; ``center``: see :func:`cosine_distances`.
    Returns (len(rows), n_pool); every row is >= 0 and sums to 1.
    """
    if not mu > 0:
        raise ValueError(f"mu must be > 0 (cafedistill.mu), got {mu}")
    D = cosine_distances(H, rows, center)
    return np.stack([project_simplex(-d / (2.0 * mu)) for d in D])


def aggregate_heads(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """hbar_i = sum_j w_ij h_j for every row of W: (rows, n_pool) @ (n_pool, p)."""
    H = _check_heads(H)
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != H.shape[0]:
        raise ValueError(f"W must be (rows, n_pool={H.shape[0]}), got shape {W.shape}")
    return W @ H


def pack_head(weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """h = [vec(W), b] as float64, the vector the cosine and the mix act on."""
    return np.concatenate(
        [weight.detach().reshape(-1).double().cpu().numpy(), bias.detach().reshape(-1).double().cpu().numpy()]
    )


def unpack_head(h: np.ndarray, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_head`: (weight (C, D), bias (C,)) as float32 tensors."""
    h = np.asarray(h)
    expected = out_features * in_features + out_features
    if h.shape != (expected,):
        raise ValueError(f"head vector has shape {h.shape}, expected ({expected},) for a {out_features}x{in_features} head")
    w = torch.from_numpy(h[: out_features * in_features].reshape(out_features, in_features).astype(np.float32))
    b = torch.from_numpy(h[out_features * in_features :].astype(np.float32))
    return w, b
