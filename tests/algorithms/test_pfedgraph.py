"""pFedGraph-EE (ICML 2023): collaboration-graph QP from model cosines and data sizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.base import ClientOutput, ClientResult, Message, ServerState
from cafe_ray.algorithms.pfedgraph import PFedGraphEE, cosine_pull, graph_weights
from cafe_ray.algorithms.training import sum_exit_ce
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def graph(**hp: float) -> PFedGraphEE:
    return PFedGraphEE(make_cfg("pfedgraph_ee", pfedgraph=hp))


def objective(a: np.ndarray, d: np.ndarray, p: np.ndarray, alpha: float) -> float:
    return float(a @ d + alpha * ((a - p) ** 2).sum())


def upload(cid: int, w: list[float], n: int) -> ClientResult:
    out = ClientOutput(upload=Message(tensors={"w": torch.tensor(w)}), personal=None, num_samples=n,
                       samples_processed=n, trained_depth=1)
    return ClientResult(cid, out)


def test_registered() -> None:
    assert get_algorithm("pfedgraph_ee") is PFedGraphEE and PFedGraphEE.personalized


def test_graph_rows_sum_to_one_and_favour_similar_clients() -> None:
    cos = np.array([[1.0, 0.8, -0.5], [0.8, 1.0, -0.4], [-0.5, -0.4, 1.0]])
    A = graph_weights(cos, np.full(3, 1 / 3), alpha=0.5)
    np.testing.assert_allclose(A.sum(axis=1), 1.0)
    assert (A >= 0).all()
    assert A[0, 1] > A[0, 2] and A[1, 0] > A[1, 2]


def test_graph_row_solves_the_qp() -> None:
    rng = np.random.default_rng(0)
    cos = np.array([[1.0, 0.3, -0.2, 0.5], [0.3, 1.0, 0.1, 0.0], [-0.2, 0.1, 1.0, 0.2], [0.5, 0.0, 0.2, 1.0]])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    A = graph_weights(cos, p, alpha=0.3)
    d = -cos[0]
    d[d < -0.9] = -1.0
    best = objective(A[0], d, p, 0.3)
    for _ in range(2000):  # no random point of the simplex does better
        a = rng.dirichlet(np.ones(4))
        assert objective(a, d, p, 0.3) >= best - 1e-12


def test_large_alpha_gives_the_data_size_weights() -> None:
    p = np.array([0.5, 0.3, 0.2])
    A = graph_weights(np.eye(3), p, alpha=1e6)
    np.testing.assert_allclose(A, np.tile(p, (3, 1)), atol=1e-5)


def test_graph_rejects_non_positive_alpha() -> None:
    with pytest.raises(ValueError, match=r"pfedgraph\.alpha must be > 0, got 0"):
        graph_weights(np.eye(2), np.full(2, 0.5), alpha=0.0)


def test_aggregate_mixes_crafted_params_along_the_graph() -> None:
    alg = graph(alpha=0.5)
    state = ServerState(tensors={"init/w": torch.zeros(3)})
    results = [upload(0, [1.0, 0.1, 0.0], 10), upload(1, [1.0, 0.0, 0.1], 10), upload(2, [-1.0, 0.0, 0.5], 10)]
    new = alg.aggregate(state, results, round_ctx(0, 1, (0, 1, 2)))
    A = np.array(new.meta["graph"]["weights"])
    assert new.meta["graph"]["clients"] == [0, 1, 2]
    np.testing.assert_allclose(A.sum(axis=1), 1.0, atol=1e-5)
    assert A[0, 1] > A[0, 2]
    expect = sum(A[0, j] * results[j].output.upload.tensors["w"] for j in range(3))
    torch.testing.assert_close(new.tensors["agg/0/w"], expect.float(), atol=1e-5, rtol=1e-5)


def test_payload_is_the_aggregated_model_with_the_pull_on() -> None:
    alg = graph()
    state = ServerState(tensors={"init/w": torch.zeros(2), "agg/3/w": torch.ones(2)})
    payloads = alg.server_payloads(state, round_ctx(1, 2, (3, 4)))
    torch.testing.assert_close(payloads[3].tensors["w"], torch.ones(2))
    assert payloads[3].meta["regularize"] and not payloads[4].meta["regularize"]
    torch.testing.assert_close(payloads[4].tensors["w"], torch.zeros(2))


def test_cosine_pull_matches_a_hand_computation(tiny_een: EarlyExitNet) -> None:
    anchor = {n: p.detach() * 2 + 0.1 for n, p in tiny_een.named_parameters()}
    d = make_clients(1)[0]
    x, y = d.x_train[:8], d.y_train[:8]
    theta = torch.cat([p.detach().reshape(-1) for p in tiny_een.parameters()])
    ref = torch.cat([anchor[n].reshape(-1) for n, _ in tiny_een.named_parameters()])
    with torch.no_grad():
        expected = float(sum_exit_ce(tiny_een, x, y)) + 0.7 * (1 - float(F.cosine_similarity(theta, ref, dim=0)))
        assert float(cosine_pull(anchor, 0.7)(tiny_een, x, y)) == pytest.approx(expected, rel=1e-5)


def test_round_trains_uploads_and_keeps_the_model_personal(tiny_een: EarlyExitNet) -> None:
    alg = graph()
    state = alg.init_server_state(tiny_een)
    payload = alg.server_payloads(state, round_ctx(0, 1, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert sorted(out.upload.tensors) == sorted(out.personal) == sorted(tiny_een.state_dict())
    assert not torch.equal(out.personal["stages.0.0.weight"], payload.tensors["stages.0.0.weight"])


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "pfedgraph_ee")["acc_avg_exit"] > LEARNS
