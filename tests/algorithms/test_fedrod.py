"""FedRoD-EE (arXiv:2107.00778): balanced-softmax generic heads, personal logits = generic + personal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.base import Message
from cafe_ray.algorithms.fedrod import FedRoDEE, balanced_softmax_loss, fedrod_loss
from cafe_ray.algorithms.heads import HeadProbe, final_linear_keys
from cafe_ray.config import ModelConfig
from cafe_ray.models.base import EarlyExitNet, LastExitHead
from cafe_ray.models.zoo import build_model
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def small_cnn() -> EarlyExitNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn_small", width=4), "digits", (1, 8, 8), 10)


def random_personal(model: EarlyExitNet, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    out = {}
    for k in range(model.num_exits):
        wk, bk = final_linear_keys(model, k)
        out[f"phead.{k}.weight"] = torch.randn(sd[wk].shape, generator=g)
        out[f"phead.{k}.bias"] = torch.randn(sd[bk].shape, generator=g)
    return out


def test_registered() -> None:
    assert get_algorithm("fedrod_ee") is FedRoDEE and FedRoDEE.personalized


def test_balanced_softmax_matches_a_hand_computation() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([0, 2])
    n = [2.0, 1.0, 4.0]

    def nll(row: list[float], c: int) -> float:
        return -math.log(n[c] * math.exp(row[c]) / sum(nj * math.exp(zj) for nj, zj in zip(n, row, strict=True)))

    expected = (nll([1.0, 2.0, 0.5], 0) + nll([0.0, -1.0, 3.0], 2)) / 2
    assert float(balanced_softmax_loss(z, y, torch.tensor(n))) == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_ignores_unseen_classes() -> None:
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 2, 0, 2])
    loss = balanced_softmax_loss(z, y, torch.tensor([3.0, 0.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert torch.all(z.grad[:, 1] == 0)  # a class the client never saw gets no probability


def test_head_probe_returns_the_final_linear_inputs() -> None:
    model = small_cnn()
    x = torch.randn(5, 1, 8, 8)
    logits, feats = HeadProbe(model)(x)
    h = model.stages[0](x)
    torch.testing.assert_close(feats[0], model.exits[0][1](model.exits[0][0](h)))  # pooled, flattened
    for z, ref in zip(logits, model(x), strict=True):
        torch.testing.assert_close(z, ref)
    assert final_linear_keys(model, 0) == ("exits.0.2.weight", "exits.0.2.bias")
    assert final_linear_keys(model, 2) == ("exits.2.linear.weight", "exits.2.linear.bias")


def test_head_probe_rejects_a_head_that_post_processes_its_logits() -> None:
    stages = [nn.Linear(4, 4), nn.Linear(4, 4)]
    exits = [nn.Sequential(nn.Linear(4, 3), nn.ReLU()), LastExitHead(nn.Identity(), 4, 3)]
    probe = HeadProbe(EarlyExitNet(stages, exits, 3))
    with pytest.raises(ValueError, match="exit 0: the head's output is not its last nn.Linear's output"):
        probe(torch.randn(2, 4))


def test_personal_loss_trains_only_the_personal_heads() -> None:
    model = small_cnn()
    heads = [(nn.Parameter(torch.randn(10, w.shape[1])), nn.Parameter(torch.zeros(10)))
             for w in (model.state_dict()[final_linear_keys(model, k)[0]] for k in range(3))]
    d = make_clients(1, in_dim=64, num_classes=10)[0]
    x, y = d.x_train[:16].reshape(16, 1, 8, 8), d.y_train[:16]
    counts = torch.bincount(y, minlength=10).float()
    fedrod_loss(HeadProbe(model), heads, counts)(model, x, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(balanced_softmax_loss(z, y, counts) for z in model(x)).backward()
    for n, p in model.named_parameters():  # the model only sees the balanced loss
        torch.testing.assert_close(grads[n], p.grad)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w, _ in heads)


def test_eval_model_gives_generic_plus_personal_logits() -> None:
    model = small_cnn()
    alg = FedRoDEE(make_cfg("fedrod_ee"))
    generic = {k: v + 0.01 for k, v in model.state_dict().items()}
    personal = random_personal(model)
    ref = copy.deepcopy(model)
    ref.load_state_dict(generic)
    x = torch.randn(6, 1, 8, 8)
    logits, feats = HeadProbe(ref)(x)
    alg.load_for_eval(model, Message(tensors=generic), personal, make_clients(1)[0], client_ctx(0, 0, 1))
    for k, (z, f, out) in enumerate(zip(logits, feats, model(x), strict=True)):
        expect = z + F.linear(f, personal[f"phead.{k}.weight"], personal[f"phead.{k}.bias"])
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_round_shares_generic_model_and_keeps_personal_heads(tiny_een: EarlyExitNet) -> None:
    alg = FedRoDEE(make_cfg("fedrod_ee"))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert sorted(out.upload.tensors) == sorted(tiny_een.state_dict())
    assert sorted(out.personal) == sorted(f"phead.{k}.{p}" for k in range(3) for p in ("weight", "bias"))
    assert out.personal["phead.0.weight"].abs().sum() > 0  # trained away from its zero init


def test_personal_heads_can_start_at_the_generic_head(tiny_een: EarlyExitNet) -> None:
    alg = FedRoDEE(make_cfg("fedrod_ee", fedrod={"personal_init": "generic"}))
    heads = alg.personal_heads(tiny_een, None)
    torch.testing.assert_close(heads[0][0].detach(), tiny_een.state_dict()["exits.0.weight"])


def test_learns_on_digits(tmp_path) -> None:
    assert run_digits(tmp_path, "fedrod_ee")["acc_avg_exit"] > LEARNS


def test_prior_init_starts_personal_logits_at_the_bayes_posterior(tiny_een: EarlyExitNet) -> None:
    """personal_init=prior: W = 0, b = log(pi_i), so softmax(personal) is proportional to softmax(generic) * pi_i."""
    from cafe_ray.algorithms.fedrod import PRIOR_FLOOR, residual_heads

    counts = torch.tensor([3.0, 1.0, 0.0, 4.0])
    heads = residual_heads(tiny_een, None, "prior", counts)
    for w, b in heads:
        assert torch.count_nonzero(w) == 0
        torch.testing.assert_close(b.detach(), torch.tensor([3 / 8, 1 / 8, PRIOR_FLOOR, 4 / 8]).log())
    with pytest.raises(ValueError, match="label counts"):
        residual_heads(tiny_een, None, "prior")
    alg = FedRoDEE(make_cfg("fedrod_ee", fedrod={"personal_init": "prior"}))
    data = make_clients(1)[0]
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data, client_ctx(0, 0, 1))
    prior = torch.bincount(data.y_train.long(), minlength=4).float()
    start = (prior / prior.sum()).clamp_min(PRIOR_FLOOR).log()
    assert (out.personal["phead.2.bias"] - start).abs().max() < 1.0  # trained from the prior, not from 0
