"""The baselines Local-EE, FedAvg-EE, FedProx-EE, FedPer-EE and the aggregation module (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.aggregation import StreamingMean, flatten, subtract, weighted_mean
from cafe_ray.algorithms.base import ClientResult, Message, global_params
from cafe_ray.algorithms.fedavg import FedAvgEE, FedProxEE
from cafe_ray.algorithms.fedper import FedPerEE
from cafe_ray.algorithms.local import LocalEE
from cafe_ray.algorithms.training import sum_exit_ce
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import (
    client_ctx,
    evaluate,
    make_cfg,
    make_clients,
    round_ctx,
    run_rounds,
)


def random_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, 2, generator=g),
        "b": torch.randn(4, generator=g),
        "count": torch.tensor(seed, dtype=torch.long),
    }


# ------------------------------------------------------------------ aggregation
def test_streaming_mean_equals_weighted_mean() -> None:
    items = [(random_params(s), float(w)) for s, w in [(0, 1), (1, 3), (2, 0.5), (3, 7)]]
    mean = StreamingMean()
    for p, w in items:
        mean.add(p, w)
    stream, ref = mean.result(like=items[0][0]), weighted_mean(items)
    assert stream.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(stream[k], ref[k])


def test_streaming_mean_keeps_the_first_counter() -> None:
    mean = StreamingMean()
    mean.add(random_params(5), 1.0)
    mean.add(random_params(9), 1.0)
    assert int(mean.result()["count"]) == 5


def test_streaming_mean_rejects_negative_weight() -> None:
    with pytest.raises(ValueError, match="aggregation weight must be >= 0, got -1"):
        StreamingMean().add(random_params(0), -1.0)


def test_streaming_mean_rejects_zero_total_weight() -> None:
    mean = StreamingMean()
    mean.add(random_params(0), 0.0)
    with pytest.raises(ValueError, match="no update with positive weight"):
        mean.result()


def test_streaming_mean_rejects_different_keys() -> None:
    mean = StreamingMean()
    mean.add(random_params(0), 1.0)
    with pytest.raises(KeyError, match="update keys differ from the first update"):
        mean.add({"a": torch.zeros(3, 2)}, 1.0)


def test_weighted_mean_rejects_zero_total_weight() -> None:
    with pytest.raises(ValueError, match="no update with positive weight"):
        weighted_mean([(random_params(0), 0.0)])


def test_subtract_skips_counters() -> None:
    d = subtract(random_params(2), random_params(1))
    assert sorted(d) == ["a", "b"]
    torch.testing.assert_close(d["a"], random_params(2)["a"] - random_params(1)["a"])


def test_flatten_uses_sorted_key_order() -> None:
    p = {"z": torch.tensor([1.0]), "a": torch.tensor([2.0, 3.0]), "n": torch.tensor(1)}
    torch.testing.assert_close(flatten(p), torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(flatten(p, ["z"]), torch.tensor([1.0], dtype=torch.float64))


# ---------------------------------------------------------------------- local
def test_local_uploads_nothing(tiny_een: EarlyExitNet) -> None:
    alg = LocalEE(make_cfg("local_ee"))
    state = alg.init_server_state(tiny_een)
    payload = alg.server_payloads(state, round_ctx(0, 1, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert payload.nbytes == 0 and out.upload.nbytes == 0
    assert sorted(out.personal) == sorted(tiny_een.state_dict())
    assert alg.aggregate(state, [ClientResult(0, out)], round_ctx(0, 1, (0,))) is state


def test_local_continues_from_personal_state(tiny_een: EarlyExitNet) -> None:
    alg = LocalEE(make_cfg("local_ee", train={"lr": 1e-9, "momentum": 0.0}))
    personal = {k: v + 1.0 if v.is_floating_point() else v for k, v in tiny_een.state_dict().items()}
    out = alg.client_update(copy.deepcopy(tiny_een), Message(), personal, make_clients(1)[0], client_ctx(0, 0, 1))
    torch.testing.assert_close(out.personal["stages.0.0.weight"], personal["stages.0.0.weight"])


# --------------------------------------------------------------------- fedavg
def test_fedavg_shares_the_whole_model(tiny_een: EarlyExitNet) -> None:
    alg = FedAvgEE(make_cfg("fedavg_ee"))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    assert sorted(payload.tensors) == sorted(tiny_een.state_dict())
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert sorted(out.upload.tensors) == sorted(tiny_een.state_dict()) and out.personal is None


def test_fedavg_aggregate_is_the_sample_weighted_mean(tiny_een: EarlyExitNet) -> None:
    alg = FedAvgEE(make_cfg("fedavg_ee"))
    state = alg.init_server_state(tiny_een)
    data = make_clients(2)
    data[1] = type(data[1])(data[1].x_train[:16], data[1].y_train[:16], data[1].x_test, data[1].y_test)
    payloads = alg.server_payloads(state, round_ctx(0, 1, (0, 1)))
    results = [
        ClientResult(c, alg.client_update(copy.deepcopy(tiny_een), payloads[c], None, data[c], client_ctx(c, 0, 1)))
        for c in (0, 1)
    ]
    new = global_params(alg.aggregate(state, results, round_ctx(0, 1, (0, 1))))
    ups = [r.output.upload.tensors for r in results]
    for k in ("stages.0.0.weight", "exits.2.linear.bias"):
        torch.testing.assert_close(new[k], (48 * ups[0][k] + 16 * ups[1][k]) / 64)


def test_fedavg_aggregate_without_results_keeps_state(tiny_een: EarlyExitNet) -> None:
    alg = FedAvgEE(make_cfg("fedavg_ee"))
    state = alg.init_server_state(tiny_een)
    assert alg.aggregate(state, [], round_ctx(0, 1, ())) is state


# -------------------------------------------------------------------- fedprox
def test_fedprox_loss_adds_the_proximal_term(tiny_een: EarlyExitNet) -> None:
    alg = FedProxEE(make_cfg("fedprox_ee", fedprox={"mu_prox": 0.5}))
    anchor = {n: p.detach() - 0.1 for n, p in tiny_een.named_parameters()}
    d = make_clients(1)[0]
    x, y = d.x_train[:8], d.y_train[:8]
    sq = sum(float(((p.detach() - anchor[n]) ** 2).sum()) for n, p in tiny_een.named_parameters())
    with torch.no_grad():
        expected = float(sum_exit_ce(tiny_een, x, y)) + 0.25 * sq
        assert float(alg._loss(anchor)(tiny_een, x, y)) == pytest.approx(expected, rel=1e-5)


def test_fedprox_pulls_toward_the_anchor(tiny_een: EarlyExitNet) -> None:
    train = {"momentum": 0.0, "lr": 0.1}
    data, cctx = make_clients(1)[0], client_ctx(0, 0, 1)

    def distance(alg: FedAvgEE) -> float:
        payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
        out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data, cctx)
        return float((flatten(out.upload.tensors) - flatten(payload.tensors)).norm())

    free = distance(FedAvgEE(make_cfg("fedavg_ee", train=train)))
    prox = distance(FedProxEE(make_cfg("fedprox_ee", train=train, fedprox={"mu_prox": 5.0})))
    assert prox < 0.9 * free


# --------------------------------------------------------------------- fedper
def test_fedper_shares_only_the_backbone(tiny_een: EarlyExitNet) -> None:
    alg = FedPerEE(make_cfg("fedper_ee"))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 1))
    assert sorted(payload.tensors) == sorted(tiny_een.backbone_keys())
    assert sorted(out.upload.tensors) == sorted(tiny_een.backbone_keys())
    assert sorted(out.personal) == sorted(k for k in tiny_een.state_dict() if k.startswith("exits."))


def test_fedper_heads_stay_personal(tiny_een: EarlyExitNet) -> None:
    alg = FedPerEE(make_cfg("fedper_ee", train={"lr": 1e-9, "momentum": 0.0}))
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 1, (0,)))[0]
    personal = {k: torch.full_like(v, 0.5) for k, v in tiny_een.state_dict().items() if k.startswith("exits.")}
    out = alg.client_update(copy.deepcopy(tiny_een), payload, personal, make_clients(1)[0], client_ctx(0, 0, 1))
    torch.testing.assert_close(out.personal["exits.0.weight"], personal["exits.0.weight"])


def test_fedper_clients_end_with_different_heads(tiny_een: EarlyExitNet) -> None:
    alg = FedPerEE(make_cfg("fedper_ee"))
    _, personal = run_rounds(alg, tiny_een, make_clients(2, n_train=16, n_test=8), 2)
    assert not torch.equal(personal[0]["exits.1.weight"], personal[1]["exits.1.weight"])


@pytest.mark.parametrize("name", ["local_ee", "fedavg_ee", "fedprox_ee", "fedper_ee"])
def test_baseline_learns_above_chance(tiny_een: EarlyExitNet, name: str) -> None:
    alg = get_algorithm(name)(make_cfg(name))
    data = make_clients(3, n_train=32, n_test=32)
    state, personal = run_rounds(alg, tiny_een, data, 3)
    assert max(evaluate(alg, tiny_een, state, personal, data)) > 0.5  # chance is 1/4
