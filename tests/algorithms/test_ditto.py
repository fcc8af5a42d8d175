"""Ditto-EE (arXiv:2012.04221): FedAvg global EEN plus a personal EEN pulled toward it."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.aggregation import flatten
from cafe_ray.algorithms.base import Message
from cafe_ray.algorithms.ditto import DittoEE, proximal_loss
from cafe_ray.algorithms.training import sum_exit_ce
from cafe_ray.config import ConfigError
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def test_registered() -> None:
    assert get_algorithm("ditto_ee") is DittoEE and DittoEE.personalized


def test_proximal_loss_adds_half_lambda_squared_distance(tiny_een: EarlyExitNet) -> None:
    anchor = {n: p.detach() + 0.2 for n, p in tiny_een.named_parameters()}
    d = make_clients(1)[0]
    x, y = d.x_train[:8], d.y_train[:8]
    sq = sum(float(((p.detach() - anchor[n]) ** 2).sum()) for n, p in tiny_een.named_parameters())
    with torch.no_grad():
        expected = float(sum_exit_ce(tiny_een, x, y)) + 0.5 * 0.3 * sq
        assert float(proximal_loss(anchor, 0.3)(tiny_een, x, y)) == pytest.approx(expected, rel=1e-5)


def test_personal_model_is_pulled_toward_the_global_model(tiny_een: EarlyExitNet) -> None:
    train = {"momentum": 0.0, "lr": 0.1}
    data, ctx = make_clients(1)[0], client_ctx(0, 0, 1)
    global_w = {k: v + 0.3 for k, v in tiny_een.state_dict().items()}

    def distance(lam: float) -> float:
        alg = DittoEE(make_cfg("ditto_ee", train=train, ditto={"lam": lam, "personal_epochs": 3}))
        out = alg.client_update(copy.deepcopy(tiny_een), Message(tensors=global_w), None, data, ctx)
        return float((flatten(out.personal) - flatten(global_w)).norm())

    assert distance(2.0) < 0.8 * distance(0.0)


def test_upload_is_the_global_update_and_personal_the_own_model(tiny_een: EarlyExitNet) -> None:
    alg = DittoEE(make_cfg("ditto_ee"))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    personal = {k: v + 1.0 for k, v in tiny_een.state_dict().items()}
    data = make_clients(1)[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, personal, data, client_ctx(0, 0, 1))
    assert sorted(out.upload.tensors) == sorted(out.personal) == sorted(tiny_een.state_dict())
    # v_i continued from its own state, w from the payload: they are far apart
    assert float((flatten(out.personal) - flatten(out.upload.tensors)).norm()) > 1.0
    assert out.samples_processed == 2 * data.num_train


def test_eval_runs_the_personal_model_else_the_global(tiny_een: EarlyExitNet) -> None:
    alg = DittoEE(make_cfg("ditto_ee"))
    global_w = {k: v + 0.5 for k, v in tiny_een.state_dict().items()}
    personal = {k: v - 0.5 for k, v in tiny_een.state_dict().items()}
    for pers, expect in ((personal, personal), (None, global_w)):
        model = copy.deepcopy(tiny_een)
        alg.load_for_eval(model, Message(tensors=global_w), pers, make_clients(1)[0], client_ctx(0, 0, 1))
        torch.testing.assert_close(model.state_dict()["stages.0.0.weight"], expect["stages.0.0.weight"])


def test_lambda_must_be_non_negative() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.ditto\.lam: Input should be greater than or equal to 0"):
        make_cfg("ditto_ee", ditto={"lam": -1})


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "ditto_ee")["acc_avg_exit"] > LEARNS
