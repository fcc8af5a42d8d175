"""FedAMP-EE (arXiv:2007.03797): attention weights from model distances, proximal pull to u_i."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.aggregation import flatten
from cafe_ray.algorithms.base import ClientResult, Message, ServerState
from cafe_ray.algorithms.fedamp import FedAMPEE, attention_matrix, attention_row
from cafe_ray.algorithms.pairwise import cosine_similarities, gram, squared_distances
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def amp(**hp: float) -> FedAMPEE:
    return FedAMPEE(make_cfg("fedamp_ee", fedamp=hp))


def crafted_state() -> ServerState:
    """Init at 0; clients 0 and 1 close together, client 2 far away."""
    vec = {0: [1.0, 0.0, 0.0], 1: [1.1, 0.0, 0.0], 2: [-3.0, 2.0, 0.0]}
    tensors = {"init/w": torch.zeros(3)}
    tensors.update({f"models/{c}/w": torch.tensor(v) for c, v in vec.items()})
    return ServerState(tensors=tensors)


def test_registered() -> None:
    assert get_algorithm("fedamp_ee") is FedAMPEE and FedAMPEE.personalized


def test_gram_gives_distances_and_cosines() -> None:
    models = [{"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0])}, {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([0.0])}]
    G = gram(models)
    np.testing.assert_allclose(squared_distances(G), [[0, 25], [25, 0]])
    np.testing.assert_allclose(cosine_similarities(G), [[1, 0], [0, 1]])


def test_attention_rows_sum_to_one_and_favour_similar_models() -> None:
    D = np.array([[0.0, 1.0, 9.0], [1.0, 0.0, 8.0], [9.0, 8.0, 0.0]])
    Xi = attention_matrix(D, alpha_k=0.5, sigma=2.0)
    np.testing.assert_allclose(Xi.sum(axis=1), 1.0)
    assert Xi[0, 1] > Xi[0, 2] and Xi[2, 1] > Xi[2, 0]
    assert Xi[0, 1] == pytest.approx(0.5 * math.exp(-1.0 / 2.0) / 2.0)
    assert Xi[0, 0] == pytest.approx(1.0 - Xi[0, 1] - Xi[0, 2])


def test_attention_rescales_neighbours_that_sum_above_one() -> None:
    xi, self_w = attention_row(np.array([0.0, 0.0, 0.0]), alpha_k=1.0, sigma=1.0)  # 3 x 1.0
    np.testing.assert_allclose(xi, [1 / 3] * 3)
    assert self_w == 0.0
    xi, self_w = attention_row(np.array([0.0, 0.0, 0.0]), alpha_k=1.0, sigma=1.0, min_self_weight=0.4)
    np.testing.assert_allclose(xi, [0.2] * 3)
    assert self_w == pytest.approx(0.4)
    xi, self_w = attention_row(np.array([50.0, 50.0]), alpha_k=1.0, sigma=1.0, min_self_weight=0.4)
    assert self_w > 0.99  # the floor only binds when the neighbours would crowd the own model out


def test_default_own_weight_stays_positive_where_it_used_to_degenerate(tiny_een: EarlyExitNet) -> None:
    """20 clients, close models, default sigma: the old rule gave xi_ii = 0 to everyone."""
    data = make_clients(20, n_train=16)
    alg = amp()  # the defaults
    assert alg.cfg.algorithm.fedamp.min_self_weight > 0
    state = alg.init_server_state(tiny_een)
    parts = tuple(range(20))
    for t in range(2):
        payloads = alg.server_payloads(state, round_ctx(t, 2, parts))
        assert min(p.meta["xi_self"] for p in payloads.values()) >= alg.cfg.algorithm.fedamp.min_self_weight - 1e-12
        results = [ClientResult(c, alg.client_update(copy.deepcopy(tiny_een), payloads[c], None, data[c],
                                                     client_ctx(c, t, 2))) for c in parts]
        state = alg.aggregate(state, results, round_ctx(t, 2, parts))
    old = FedAMPEE(make_cfg("fedamp_ee", fedamp={"min_self_weight": 0.0}))
    assert max(p.meta["xi_self"] for p in old.server_payloads(state, round_ctx(2, 3, parts)).values()) == 0.0


def test_attention_rejects_non_positive_hyperparameters() -> None:
    with pytest.raises(ValueError, match="alpha_k and sigma must be > 0, got alpha_k=0"):
        attention_row(np.zeros(2), alpha_k=0.0, sigma=1.0)


def test_cloud_model_is_the_attention_mix_of_crafted_params() -> None:
    alg = amp(alpha_k=0.5, sigma=4.0)
    u, self_w = alg.cloud_models(crafted_state(), (0,))[0]
    xi, expect_self = attention_row(np.array([0.01, 20.0]), 0.5, 4.0)  # ||t0-t1||^2, ||t0-t2||^2
    assert xi[0] > 10 * xi[1] and self_w == pytest.approx(expect_self)
    expect = self_w * torch.tensor([1.0, 0, 0]) + xi[0] * torch.tensor([1.1, 0, 0]) + xi[1] * torch.tensor([-3.0, 2, 0])
    torch.testing.assert_close(u["w"], expect.float())


def test_a_newcomer_is_compared_as_the_initial_model() -> None:
    alg = amp(alpha_k=0.5, sigma=4.0)
    u, self_w = alg.cloud_models(crafted_state(), (7,))[7]
    xi, expect_self = attention_row(np.array([1.0, 1.21, 13.0]), 0.5, 4.0)  # distances from 0
    assert self_w == pytest.approx(expect_self)
    torch.testing.assert_close(u["w"], (xi[0] * torch.tensor([1.0, 0, 0]) + xi[1] * torch.tensor([1.1, 0, 0])
                                        + xi[2] * torch.tensor([-3.0, 2, 0])).float())


def test_local_training_is_pulled_toward_the_cloud_model(tiny_een: EarlyExitNet) -> None:
    train = {"momentum": 0.0, "lr": 0.1}
    u = {k: v + 0.3 for k, v in tiny_een.state_dict().items()}

    def distance(lam: float) -> float:
        alg = FedAMPEE(make_cfg("fedamp_ee", train=train, fedamp={"lam": lam, "alpha_k": 0.5}))
        out = alg.client_update(copy.deepcopy(tiny_een), Message(tensors=u), None, make_clients(1)[0], client_ctx(0, 0, 1))
        return float((flatten(out.personal) - flatten(u)).norm())

    assert distance(1.0) < 0.8 * distance(0.0)


def test_aggregate_stores_every_uploaded_model(tiny_een: EarlyExitNet) -> None:
    alg = amp()
    state = alg.init_server_state(tiny_een)
    payloads = alg.server_payloads(state, round_ctx(0, 1, (0, 1)))
    data = make_clients(2)
    results = [ClientResult(c, alg.client_update(copy.deepcopy(tiny_een), payloads[c], None, data[c], client_ctx(c, 0, 1)))
               for c in (0, 1)]
    new = alg.aggregate(state, results, round_ctx(0, 1, (0, 1)))
    for r in results:
        torch.testing.assert_close(new.tensors[f"models/{r.client_id}/stages.0.0.weight"],
                                   r.output.personal["stages.0.0.weight"])
    assert alg.eval_payload(new).nbytes == 0


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "fedamp_ee")["acc_avg_exit"] > LEARNS
