"""Teacher weights w_ij and aggregated heads hbar_i of CAFEDistill (arXiv:2601.10015)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cafe_ray.algorithms.cafedistill.teacher import (
    aggregate_heads,
    cosine_distances,
    pack_head,
    project_simplex,
    teacher_weights,
    unpack_head,
)


def qp_reference(linear: np.ndarray, quad: float) -> np.ndarray:
    """argmin over the simplex of linear.w + quad*||w||^2 by a generic solver (SLSQP)."""
    n = linear.size
    res = minimize(
        lambda w: float(linear @ w + quad * w @ w),
        np.full(n, 1.0 / n),
        jac=lambda w: linear + 2 * quad * w,
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(5))
def test_project_simplex_matches_a_generic_solver(seed: int) -> None:
    g = np.random.default_rng(seed)
    v = g.normal(scale=2.0, size=int(g.integers(1, 8)))
    # projection = argmin ||w - v||^2 = argmin -2 v.w + ||w||^2
    np.testing.assert_allclose(project_simplex(v), qp_reference(-2 * v, 1.0), atol=1e-6)


def test_project_simplex_keeps_a_point_of_the_simplex() -> None:
    w = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(project_simplex(w), w, atol=1e-15)


def test_project_simplex_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty 1-D vector"):
        project_simplex(np.zeros(0))


def test_project_simplex_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        project_simplex(np.array([0.0, np.nan]))


@pytest.mark.parametrize("seed", range(4))
def test_teacher_weights_solve_the_qp(seed: int) -> None:
    g = np.random.default_rng(seed)
    H = g.normal(size=(5, 7))
    mu = float(g.uniform(0.05, 2.0))
    W = teacher_weights(H, mu)
    D = cosine_distances(H)
    for i in range(5):
        np.testing.assert_allclose(W[i], qp_reference(D[i], mu), atol=1e-6)


def test_teacher_weights_rows_are_on_the_simplex() -> None:
    W = teacher_weights(np.random.default_rng(0).normal(size=(6, 4)), mu=0.3)
    assert (W >= 0).all()
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)


def test_small_mu_keeps_the_own_teacher() -> None:
    W = teacher_weights(np.random.default_rng(1).normal(size=(4, 6)), mu=1e-6)
    np.testing.assert_allclose(W, np.eye(4), atol=1e-12)


def test_large_mu_spreads_uniformly() -> None:
    W = teacher_weights(np.random.default_rng(2).normal(size=(4, 6)), mu=1e6)
    np.testing.assert_allclose(W, np.full((4, 4), 0.25), atol=1e-6)


def test_similar_heads_get_more_weight() -> None:
    H = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2]])
    w0 = teacher_weights(H, mu=0.5)[0]
    assert w0[0] > w0[1] > w0[2]


def test_rows_subset_equals_full_rows() -> None:
    H = np.random.default_rng(3).normal(size=(5, 3))
    np.testing.assert_allclose(teacher_weights(H, 0.4, rows=[3, 1]), teacher_weights(H, 0.4)[[3, 1]])


def test_zero_head_is_its_own_closest_teacher() -> None:
    D = cosine_distances(np.array([[0.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(D, [[0.0, 1.0], [1.0, 0.0]])


def test_teacher_weights_reject_non_positive_mu() -> None:
    with pytest.raises(ValueError, match=r"mu must be > 0 \(cafedistill.mu\), got 0"):
        teacher_weights(np.ones((2, 2)), mu=0)


def test_teacher_weights_reject_a_vector() -> None:
    with pytest.raises(ValueError, match=r"H must be a non-empty \(n_pool, p\) matrix"):
        teacher_weights(np.ones(3), mu=1.0)


def test_aggregate_heads_rejects_mismatched_pool() -> None:
    with pytest.raises(ValueError, match=r"W must be \(rows, n_pool=3\)"):
        aggregate_heads(np.ones((2, 2)), np.ones((3, 4)))


def test_aggregated_head_logit_is_the_mix_of_teacher_logits() -> None:
    g = torch.Generator().manual_seed(0)
    C, Dm, n = 3, 5, 4
    heads = [(torch.randn(C, Dm, generator=g), torch.randn(C, generator=g)) for _ in range(n)]
    H = np.stack([pack_head(w, b) for w, b in heads])
    W = teacher_weights(H, mu=0.2)
    phi = torch.randn(6, Dm, generator=g, dtype=torch.float64)
    for i in range(n):
        hw, hb = unpack_head(aggregate_heads(W[i : i + 1], H)[0], C, Dm)
        mixed = phi @ hw.double().T + hb.double()  # phi(x)^T hbar_i
        direct = sum(float(W[i, j]) * (phi @ w.double().T + b.double()) for j, (w, b) in enumerate(heads))
        torch.testing.assert_close(mixed, direct, atol=1e-5, rtol=1e-5)


def test_pack_unpack_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    w2, b2 = unpack_head(pack_head(w, b), 3, 4)
    torch.testing.assert_close((w2, b2), (w, b))


def test_unpack_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"expected \(15,\) for a 3x4 head"):
        unpack_head(np.zeros(14), 3, 4)
