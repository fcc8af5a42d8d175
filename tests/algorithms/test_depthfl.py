"""DepthFL (ICLR 2023): depth-k prefixes, mutual self-distillation, layer-wise averaging."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.base import ClientResult, global_params
from cafe_ray.algorithms.depthfl import DepthFL, mutual_distillation_loss, rampup
from cafe_ray.algorithms.submodel import depth_of, prefix_keys
from cafe_ray.models.base import EarlyExitNet
from cafe_ray.runs import rundir
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def depth_keys(model: EarlyExitNet, k: int) -> list[str]:
    return [n for n in model.state_dict() if n.split(".")[0] in ("stages", "exits") and int(n.split(".")[1]) < k]


def train(alg: DepthFL, model: EarlyExitNet, cid: int, depth: int | None, n: int | None = None):
    state = alg.init_server_state(copy.deepcopy(model))
    payload = alg.server_payloads(state, round_ctx(0, 1, (cid,)))[cid]
    data = make_clients(cid + 1)[cid]
    if n is not None:
        data = type(data)(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test)
    net = copy.deepcopy(model)
    out = alg.client_update(net, payload, None, data, replace(client_ctx(cid, 0, 1), max_depth=depth))
    return state, payload, net, out


def test_registered() -> None:
    assert get_algorithm("depthfl") is DepthFL and not DepthFL.personalized


def test_depth_comes_from_max_depth() -> None:
    assert depth_of(None, 3) == 3 and depth_of(2, 3) == 2 and depth_of(7, 3) == 3
    with pytest.raises(ValueError, match="max_depth must be >= 1 .* got 0"):
        depth_of(0, 3)


def test_prefix_keys_are_the_first_stages_and_exits(tiny_een: EarlyExitNet) -> None:
    assert prefix_keys(list(tiny_een.state_dict()), 2) == depth_keys(tiny_een, 2)


def test_client_trains_and_uploads_only_its_prefix(tiny_een: EarlyExitNet) -> None:
    _, payload, net, out = train(DepthFL(make_cfg("depthfl")), tiny_een, 0, depth=2)
    assert sorted(out.upload.tensors) == sorted(depth_keys(tiny_een, 2)) and out.trained_depth == 2
    assert all(not torch.equal(v, payload.tensors[k]) for k, v in out.upload.tensors.items() if k.endswith("weight"))
    sd = net.state_dict()  # layers beyond k never moved
    for k in set(sd) - set(out.upload.tensors):
        assert torch.equal(sd[k], payload.tensors[k])


def test_layers_are_averaged_over_the_clients_holding_them(tiny_een: EarlyExitNet) -> None:
    alg = DepthFL(make_cfg("depthfl"))
    state, _, _, shallow = train(alg, tiny_een, 0, depth=1, n=16)
    _, _, _, deep = train(alg, tiny_een, 1, depth=3, n=48)
    new = global_params(alg.aggregate(state, [ClientResult(0, shallow), ClientResult(1, deep)], round_ctx(0, 1, (0, 1))))
    a, b = shallow.upload.tensors, deep.upload.tensors
    torch.testing.assert_close(new["stages.0.0.weight"], (16 * a["stages.0.0.weight"] + 48 * b["stages.0.0.weight"]) / 64)
    for k in ("stages.1.0.weight", "stages.2.0.weight", "exits.2.linear.weight"):
        torch.testing.assert_close(new[k], b[k])  # only the deep client holds these


def test_layers_nobody_holds_keep_their_value(tiny_een: EarlyExitNet) -> None:
    alg = DepthFL(make_cfg("depthfl"))
    state, payload, _, out = train(alg, tiny_een, 0, depth=1)
    new = global_params(alg.aggregate(state, [ClientResult(0, out)], round_ctx(0, 1, (0,))))
    assert torch.equal(new["stages.2.0.weight"], payload.tensors["stages.2.0.weight"])


def test_payload_is_the_clients_prefix_once_its_depth_is_known(tiny_een: EarlyExitNet) -> None:
    alg = DepthFL(make_cfg("depthfl"))
    state, first, _, out = train(alg, tiny_een, 0, depth=2)
    new = alg.aggregate(state, [ClientResult(0, out)], round_ctx(0, 2, (0,)))
    second = alg.server_payloads(new, round_ctx(1, 2, (0,)))[0]
    assert sorted(second.tensors) == sorted(depth_keys(tiny_een, 2)) and second.nbytes < first.nbytes


def test_mutual_distillation_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 5, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    T, w = 2.0, 0.7

    def kl(teacher: torch.Tensor, student: torch.Tensor) -> float:  # KL(p_t || p_s), batch mean
        p, q = F.softmax(teacher / T, dim=1), F.softmax(student / T, dim=1)
        return float((p * (p.log() - q.log())).sum(dim=1).mean())

    ce = sum(float(F.cross_entropy(zi, y)) for zi in z)
    kd = sum(T * T * kl(z[o], z[e]) for e in range(3) for o in range(3) if o != e) / 2
    assert float(mutual_distillation_loss(z, y, w, T)) == pytest.approx(ce + w * kd, rel=1e-5)


def test_each_exit_learns_from_the_others_detached() -> None:
    z0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = torch.tensor([0, 1, 2])
    mutual_distillation_loss([z0, z1], y, 1.0, 1.0).backward()
    ref = z0.detach().clone().requires_grad_(True)
    target = F.softmax(z1.detach(), dim=1)
    (F.cross_entropy(ref, y) + F.kl_div(F.log_softmax(ref, dim=1), target, reduction="batchmean")).backward()
    torch.testing.assert_close(z0.grad, ref.grad)


def test_a_single_exit_has_no_distillation() -> None:
    z, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert float(mutual_distillation_loss([z], y, 5.0, 1.0)) == pytest.approx(float(F.cross_entropy(z, y)))


def test_kd_weight_ramps_up() -> None:
    assert rampup(0, 0) == 1.0 and rampup(10, 10) == 1.0 and rampup(50, 10) == 1.0
    assert rampup(0, 10) == pytest.approx(math.exp(-5.0)) and rampup(5, 10) == pytest.approx(math.exp(-1.25))


def test_learns_on_digits_with_depth_limited_devices(tmp_path) -> None:
    summary = run_digits(tmp_path, "depthfl", "profiles.catalog=iot_mix")
    assert summary["acc_avg_exit"] > LEARNS
    run_dir = next((tmp_path / "runs").iterdir())
    depths = {r["profile"]: r["depth"] for r in rundir.read_jsonl(run_dir / "clients.jsonl") if r["status"] == "ok"}
    assert depths["single_board"] == 2 and depths["phone"] == 3
