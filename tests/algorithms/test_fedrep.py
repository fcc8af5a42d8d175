"""FedRep-EE (arXiv:2102.07078): heads first with the backbone frozen, then the backbone."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.fedrep import FedRepEE
from cafe_ray.config import ConfigError
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def split(model: EarlyExitNet) -> tuple[dict, dict]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in sd.items() if k.startswith("stages.")}
    heads = {k: v for k, v in sd.items() if k.startswith("exits.")}
    return backbone, heads


def changed(before: dict, after: dict) -> bool:
    return all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_registered() -> None:
    assert get_algorithm("fedrep_ee") is FedRepEE and FedRepEE.personalized


def test_head_phase_leaves_the_backbone_unchanged(tiny_een: EarlyExitNet) -> None:
    alg = FedRepEE(make_cfg("fedrep_ee"))
    body0, heads0 = split(tiny_een)
    alg.train_heads(tiny_een, make_clients(1)[0], client_ctx(0, 0, 1))
    body1, heads1 = split(tiny_een)
    assert all(torch.equal(body0[k], body1[k]) for k in body0)
    assert changed(heads0, heads1)


def test_backbone_phase_leaves_the_heads_unchanged(tiny_een: EarlyExitNet) -> None:
    alg = FedRepEE(make_cfg("fedrep_ee"))
    body0, heads0 = split(tiny_een)
    alg.train_backbone(tiny_een, make_clients(1)[0], client_ctx(0, 0, 1))
    body1, heads1 = split(tiny_een)
    assert all(torch.equal(heads0[k], heads1[k]) for k in heads0)
    assert changed(body0, body1)


def test_phases_restore_requires_grad(tiny_een: EarlyExitNet) -> None:
    alg = FedRepEE(make_cfg("fedrep_ee"))
    alg.train_heads(tiny_een, make_clients(1)[0], client_ctx(0, 0, 1))
    alg.train_backbone(tiny_een, make_clients(1)[0], client_ctx(0, 0, 1))
    assert all(p.requires_grad for p in tiny_een.parameters())


def test_round_runs_head_epochs_then_local_epochs(tiny_een: EarlyExitNet) -> None:
    alg = FedRepEE(make_cfg("fedrep_ee", fedrep={"head_epochs": 3}))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    data = make_clients(1)[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data, client_ctx(0, 0, 1))
    assert out.samples_processed == (3 + 1) * data.num_train
    assert sorted(out.upload.tensors) == sorted(tiny_een.backbone_keys())
    assert sorted(out.personal) == sorted(k for k in tiny_een.state_dict() if k.startswith("exits."))


def test_head_epochs_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.fedrep\.head_epochs: Input should be greater than or equal to 1"):
        make_cfg("fedrep_ee", fedrep={"head_epochs": 0})


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "fedrep_ee")["acc_avg_exit"] > LEARNS
