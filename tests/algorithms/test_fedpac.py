"""FedPAC-EE (arXiv:2306.11867): prototype alignment and QP-combined classifier heads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.fedpac import (
    FedPACEE,
    aligned_loss,
    alignment_loss,
    alignment_targets,
    combination_weights,
    feature_statistics,
    simplex_qp,
)
from cafe_ray.algorithms.fedrep import train_only
from cafe_ray.algorithms.heads import HeadProbe
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.config import ConfigError
from cafe_ray.models.base import EarlyExitNet, LastExitHead
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx, run_rounds
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def identity_een() -> EarlyExitNet:
    """Two identity stages: every exit's feature f_k is the input itself."""
    exits = [nn.Linear(2, 3), LastExitHead(nn.Identity(), 2, 3)]
    return EarlyExitNet([nn.Identity(), nn.Identity()], exits, 3)


def test_registered() -> None:
    assert get_algorithm("fedpac_ee") is FedPACEE and FedPACEE.personalized


def test_feature_statistics_match_a_hand_computation() -> None:
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 2, 2])
    stats = feature_statistics(HeadProbe(identity_een()), x, y, num_classes=3, batch_size=3)
    s = stats[1]
    torch.testing.assert_close(s.counts, torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(s.means, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(s.h(), torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # v = (1/N) [sum_c p_c E||f||^2 - sum_c p_c^2 ||mu_c||^2] = (1/4) [(0.5*2 + 0.5*5) - (0.25*1 + 0.25*4)]
    assert s.v() == pytest.approx(0.5625)


def test_simplex_qp_matches_the_two_client_closed_form() -> None:
    P = np.array([[2.0, 0.5], [0.5, 1.0]])
    a0 = (P[1, 1] - P[0, 1]) / (P[0, 0] + P[1, 1] - 2 * P[0, 1])
    np.testing.assert_allclose(simplex_qp(P), [a0, 1 - a0], atol=1e-8)


def test_head_weights_favour_clients_with_similar_statistics() -> None:
    H = np.array([[[1.0], [0.0]], [[1.0], [0.0]], [[0.0], [3.0]]])  # clients 0 and 1 alike
    a = combination_weights(H, np.full(3, 0.1), i=0)
    assert a.sum() == pytest.approx(1.0) and (a >= 0).all()
    assert a[0] == pytest.approx(a[1], abs=1e-6) and a[2] < 0.01
    np.testing.assert_allclose(combination_weights(H, np.full(3, 0.1), i=0, min_weight=0.01), [0.5, 0.5, 0.0])


def test_high_variance_keeps_weight_on_others() -> None:
    H = np.zeros((3, 2, 1))  # identical statistics: only the variance terms differ
    a = combination_weights(H, np.array([4.0, 1.0, 1.0]), i=0)
    np.testing.assert_allclose(a, np.array([0.25, 1.0, 1.0]) / 2.25, atol=1e-6)  # a_j ~ 1 / v_j


def test_alignment_targets_fall_back_to_local_means() -> None:
    protos = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    local = torch.tensor([[5.0, 5.0], [7.0, 7.0]])
    targets = alignment_targets(protos, torch.tensor([1.0, 0.0]), local)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 1.0], [7.0, 7.0]]))
    f, y = torch.tensor([[0.0, 1.0], [7.0, 9.0]]), torch.tensor([0, 1])
    assert float(alignment_loss(f, y, targets)) == pytest.approx((1 + 0 + 0 + 4) / 4)


def test_alignment_pulls_features_toward_the_prototypes(tiny_een: EarlyExitNet) -> None:
    data, ctx = make_clients(1)[0], client_ctx(0, 0, 1)
    train = make_cfg("fedpac_ee", train={"momentum": 0.0, "lr": 0.05, "local_epochs": 3}).train
    targets = [torch.full((4, 16), 0.5) for _ in range(3)]

    def distance(lam: float) -> float:
        model = copy.deepcopy(tiny_een)
        probe = HeadProbe(model)
        local_sgd(model, data, ctx, train, aligned_loss(probe, targets, lam), params=train_only(model, backbone=True))
        with torch.no_grad():
            _, feats = probe(data.x_train)
        return sum(float(((f - 0.5) ** 2).mean()) for f in feats)

    assert distance(5.0) < 0.8 * distance(0.0)


def test_rounds_store_prototypes_and_combined_heads(tiny_een: EarlyExitNet) -> None:
    alg = FedPACEE(make_cfg("fedpac_ee"))
    data = make_clients(3)
    state, _ = run_rounds(alg, tiny_een, data, 2)
    assert state.tensors["proto.0"].shape == (4, 16) and state.tensors["proto_mask"].sum() == 4
    alpha = state.meta["head_weights"]["alpha"]
    assert sorted(alpha) == ["0", "1", "2"] and all(abs(sum(row) - 1) < 1e-6 for rows in alpha.values() for row in rows)
    payload = alg.server_payloads(state, round_ctx(2, 3, (1,)))[1]
    assert "proto_mask" in payload.tensors
    torch.testing.assert_close(payload.tensors["exits.0.weight"], state.tensors["chead/1/exits.0.weight"])
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data[1], client_ctx(1, 2, 3))
    assert out.metrics["aligned"] == 1.0


def test_eval_runs_the_clients_combined_heads(tiny_een: EarlyExitNet) -> None:
    alg = FedPACEE(make_cfg("fedpac_ee"))
    data = make_clients(2)
    state, _ = run_rounds(alg, tiny_een, data, 1)
    model = copy.deepcopy(tiny_een)
    alg.load_for_eval(model, alg.eval_payload(state), None, data[1], client_ctx(1, 0, 1))
    torch.testing.assert_close(model.state_dict()["exits.2.linear.weight"], state.tensors["chead/1/exits.2.linear.weight"])
    torch.testing.assert_close(model.state_dict()["stages.0.0.weight"], state.tensors["global/stages.0.0.weight"])


def test_min_weight_must_be_below_one() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.fedpac\.min_weight: Input should be less than 1"):
        make_cfg("fedpac_ee", fedpac={"min_weight": 1.0})


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "fedpac_ee")["acc_avg_exit"] > LEARNS
