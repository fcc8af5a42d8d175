"""FedBABU-EE (arXiv:2106.06042): heads frozen at the shared init, fine-tuned before evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.fedbabu import FedBABUEE
from cafe_ray.config import ConfigError
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def heads(model: EarlyExitNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("exits.")}


def one_client(model: EarlyExitNet, alg: FedBABUEE):
    payload = alg.server_payloads(alg.init_server_state(copy.deepcopy(model)), round_ctx(0, 1, (0,)))[0]
    trained = copy.deepcopy(model)
    out = alg.client_update(trained, payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    return payload, trained, out


def test_registered() -> None:
    assert get_algorithm("fedbabu_ee") is FedBABUEE and FedBABUEE.personalized


def test_heads_stay_at_the_shared_init_during_federation(tiny_een: EarlyExitNet) -> None:
    _, trained, out = one_client(tiny_een, FedBABUEE(make_cfg("fedbabu_ee")))
    init_heads = heads(tiny_een)
    assert all(torch.equal(init_heads[k], v) for k, v in heads(trained).items())
    assert sorted(out.upload.tensors) == sorted(tiny_een.backbone_keys()) and out.personal is None


def test_only_the_backbone_is_trained(tiny_een: EarlyExitNet) -> None:
    payload, _, out = one_client(tiny_een, FedBABUEE(make_cfg("fedbabu_ee")))
    assert all(not torch.equal(out.upload.tensors[k], payload.tensors[k]) for k in payload.tensors)


def test_eval_fine_tunes_the_heads_on_the_global_backbone(tiny_een: EarlyExitNet) -> None:
    alg = FedBABUEE(make_cfg("fedbabu_ee"))
    payload, _, out = one_client(tiny_een, alg)
    model = copy.deepcopy(tiny_een)
    alg.load_for_eval(model, type(payload)(tensors=out.upload.tensors), None, make_clients(1)[0], client_ctx(0, 0, 1))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], out.upload.tensors[k]) for k in out.upload.tensors)
    init_heads = heads(tiny_een)
    assert all(not torch.equal(init_heads[k], v) for k, v in heads(model).items() if k.endswith("weight"))
    assert not model.training


def test_eval_fine_tuning_is_deterministic(tiny_een: EarlyExitNet) -> None:
    alg = FedBABUEE(make_cfg("fedbabu_ee"))
    payload, _, _ = one_client(tiny_een, alg)
    a, b = copy.deepcopy(tiny_een), copy.deepcopy(tiny_een)
    for m in (a, b):
        alg.load_for_eval(m, payload, None, make_clients(1)[0], client_ctx(0, 3, 5))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_zero_finetune_epochs_evaluate_the_initial_heads(tiny_een: EarlyExitNet) -> None:
    alg = FedBABUEE(make_cfg("fedbabu_ee", fedbabu={"finetune_epochs": 0}))
    payload, _, _ = one_client(tiny_een, alg)
    model = copy.deepcopy(tiny_een)
    alg.load_for_eval(model, payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert all(torch.equal(heads(tiny_een)[k], v) for k, v in heads(model).items())


def test_finetune_lr_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.fedbabu\.finetune_lr: Input should be greater than 0"):
        make_cfg("fedbabu_ee", fedbabu={"finetune_lr": 0})


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "fedbabu_ee")["acc_avg_exit"] > LEARNS
