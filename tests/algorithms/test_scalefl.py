"""ScaleFL (CVPR 2023): width x depth sub-models, KD from the deepest exit, per-element mean."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.base import ClientContext, ClientResult, global_params
from cafe_ray.algorithms.cafedistill.loss import kd_term
from cafe_ray.algorithms.scalefl import ScaleFL, align_group_norms, build_scaled, scalefl_loss
from cafe_ray.algorithms.submodel import PrefixMean, prefix_index
from cafe_ray.config import ExperimentConfig, build_config
from cafe_ray.models.base import EarlyExitNet
from cafe_ray.models.zoo import build_model
from cafe_ray.runs import rundir
from cafe_ray.sim.profiles import CATALOGS, load_trace
from tests.algorithms.helpers import client_ctx, make_clients, round_ctx
from tests.algorithms.zoo_helpers import LEARNS, run_digits


def cfg_for(name: str = "cnn_small", width: int = 8, dataset: str = "digits", **scalefl: object) -> ExperimentConfig:
    return build_config({"seed": 0, "data": {"name": dataset}, "model": {"name": name, "width": width},
                         "algorithm": {"name": "scalefl", "scalefl": scalefl}, "train": {"batch_size": 16}})


def full_model(cfg: ExperimentConfig, shape: tuple[int, ...] = (1, 8, 8)) -> EarlyExitNet:
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.name, shape, 10)


def zero_padded(full: EarlyExitNet, sub: EarlyExitNet) -> EarlyExitNet:
    """The global model with every element outside the sub-model's slice set to zero."""
    out = copy.deepcopy(full)
    small = sub.state_dict()
    padded = {}
    for k, v in full.state_dict().items():
        z = torch.zeros_like(v)
        idx = prefix_index(small[k].shape, v.shape)
        z[idx] = v[idx]
        padded[k] = z
    out.load_state_dict(padded)
    return out


def sliced(full: EarlyExitNet, sub: EarlyExitNet) -> EarlyExitNet:
    sd = full.state_dict()
    sub.load_state_dict({k: sd[k][prefix_index(v.shape, sd[k].shape)] for k, v in sub.state_dict().items()})
    return sub


def digits_data(n: int = 32):
    d = make_clients(1, n_train=n, in_dim=64, num_classes=10)[0]
    return type(d)(d.x_train.reshape(n, 1, 8, 8), d.y_train, d.x_test.reshape(-1, 1, 8, 8), d.y_test)


def ctx_with(cid: int, factor: float, depth: int | None, t: int = 0, T: int = 1) -> ClientContext:
    return replace(client_ctx(cid, t, T), width_factor=factor, max_depth=depth)


def test_registered() -> None:
    assert get_algorithm("scalefl") is ScaleFL and not ScaleFL.personalized


def test_cnn_small_sub_model_shapes_are_prefixes() -> None:
    cfg = cfg_for()
    full = full_model(cfg)
    sub, width = ScaleFL(cfg).scaled_model(full, 0.5, (1, 8, 8))
    assert width == 4
    big = full.state_dict()
    assert sub.state_dict()["stages.1.0.weight"].shape == (8, 4, 3, 3)
    for k, v in sub.state_dict().items():
        prefix_index(v.shape, big[k].shape)  # raises if not a prefix


def test_group_norms_follow_the_global_group_size() -> None:
    cfg = cfg_for("conv3", width=32, dataset="cifar10")
    full = full_model(cfg, (3, 8, 8))
    sub, width = ScaleFL(cfg).scaled_model(full, 0.5, (3, 8, 8))
    gn_full, gn_sub = full.stages[2][1], sub.stages[2][1]
    assert width == 16 and (gn_full.num_channels, gn_full.num_groups) == (128, 32)
    assert (gn_sub.num_channels, gn_sub.num_groups) == (64, 16)  # 4 channels per group, like the global layer


def test_a_sliced_sub_model_computes_the_global_model_on_its_channels() -> None:
    cfg = cfg_for("conv3", width=32, dataset="cifar10")
    full = full_model(cfg, (3, 8, 8))
    sub, _ = ScaleFL(cfg).scaled_model(full, 0.5, (3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(sliced(full, sub)(x), zero_padded(full, sub)(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        # without re-grouping, the narrower GroupNorm groups channels differently
        naive = sliced(full, build_scaled(cfg, 16, (3, 8, 8), 10))
        assert not torch.allclose(naive(x)[-1], zero_padded(full, sub)(x)[-1], atol=1e-3)


def test_widths_without_whole_groups_are_skipped() -> None:
    cfg = cfg_for(width=10)  # int(10 * 0.5) = 5 channels: not a multiple of the 2-channel groups
    full = full_model(cfg)
    probe = build_scaled(cfg, 5, (1, 8, 8), 10)
    assert not align_group_norms(probe, full)
    _, width = ScaleFL(cfg).scaled_model(full, 0.5, (1, 8, 8))
    assert width == 4


def test_prefix_mean_averages_each_element_over_its_holders() -> None:
    mean = PrefixMean({"w": torch.zeros(3, 2), "n": torch.tensor(7)})
    mean.add({"w": torch.full((1, 1), 2.0)}, 1.0)
    mean.add({"w": torch.full((3, 2), 4.0), "n": torch.tensor(1)}, 3.0)
    out = mean.result()
    expect = torch.full((3, 2), 4.0)
    expect[0, 0] = (2.0 + 3 * 4.0) / 4
    torch.testing.assert_close(out["w"], expect)
    assert int(out["n"]) == 7  # counters are not averaged


def test_prefix_mean_keeps_elements_nobody_holds() -> None:
    mean = PrefixMean({"w": torch.arange(4.0)})
    mean.add({"w": torch.tensor([9.0, 9.0])}, 2.0)
    torch.testing.assert_close(mean.result()["w"], torch.tensor([9.0, 9.0, 2.0, 3.0]))


def test_prefix_mean_rejects_a_non_prefix_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(4,\) is not a prefix slice of \(3,\)"):
        PrefixMean({"w": torch.zeros(3)}).add({"w": torch.zeros(4)}, 1.0)


def test_clients_upload_slices_and_the_server_averages_per_element() -> None:
    cfg = cfg_for()
    alg = ScaleFL(cfg)
    full = full_model(cfg)
    state = alg.init_server_state(copy.deepcopy(full))
    payloads = alg.server_payloads(state, round_ctx(0, 1, (0, 1)))
    data = digits_data()
    small = alg.client_update(copy.deepcopy(full), payloads[0], None, data, ctx_with(0, 0.5, 2))
    big = alg.client_update(copy.deepcopy(full), payloads[1], None, data, ctx_with(1, 1.0, None))
    a, b = small.upload.tensors, big.upload.tensors
    assert a["stages.0.0.weight"].shape == (4, 1, 3, 3) and "stages.2.0.weight" not in a
    assert small.trained_depth == 2 and small.metrics["width"] == 4.0
    new = global_params(alg.aggregate(state, [ClientResult(0, small), ClientResult(1, big)], round_ctx(0, 1, (0, 1))))
    w = new["stages.0.0.weight"]
    torch.testing.assert_close(w[:4], (a["stages.0.0.weight"] + b["stages.0.0.weight"][:4]) / 2)
    torch.testing.assert_close(w[4:], b["stages.0.0.weight"][4:])
    torch.testing.assert_close(new["stages.2.0.weight"], b["stages.2.0.weight"])


def test_server_sends_the_slice_once_it_knows_the_clients_spec() -> None:
    cfg = cfg_for()
    alg = ScaleFL(cfg)
    full = full_model(cfg)
    state = alg.init_server_state(copy.deepcopy(full))
    first = alg.server_payloads(state, round_ctx(0, 2, (0,)))[0]
    out = alg.client_update(copy.deepcopy(full), first, None, digits_data(), ctx_with(0, 0.5, 2))
    state = alg.aggregate(state, [ClientResult(0, out)], round_ctx(0, 2, (0,)))
    second = alg.server_payloads(state, round_ctx(1, 2, (0,)))[0]
    assert {k: v.shape for k, v in second.tensors.items()} == {k: v.shape for k, v in out.upload.tensors.items()}
    assert second.meta["spec"] == "w4_d2" and second.nbytes < first.nbytes / 2


def test_loss_is_depth_weighted_with_kd_from_the_deepest_exit() -> None:
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 5, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    w = [0.5, 1.0, 1.5]  # (1, 2, 3) rescaled to mean 1
    expected = sum(w[e] * float(F.cross_entropy(z[e], y)) for e in range(3))
    expected += sum(w[e] * 0.4 * float(kd_term(z[e], z[2], 3.0)) for e in range(2))
    assert float(scalefl_loss(z, y, 0.4, 3.0, depth_weighted=True)) == pytest.approx(expected, rel=1e-5)
    plain = sum(float(F.cross_entropy(zi, y)) for zi in z)
    assert float(scalefl_loss(z, y, 0.0, 3.0, depth_weighted=False)) == pytest.approx(plain, rel=1e-6)


def test_kd_starts_at_kd_start_of_the_rounds() -> None:
    alg = ScaleFL(cfg_for(kd_weight=1.0, kd_start=0.5))
    model = full_model(alg.cfg)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        early = float(alg.loss_fn(3, ctx_with(0, 1.0, None, t=1, T=4))(model, x, y))
        late = float(alg.loss_fn(3, ctx_with(0, 1.0, None, t=2, T=4))(model, x, y))
        z = model(x)
    assert early == pytest.approx(float(scalefl_loss(z, y, 0.0, 3.0, True)), rel=1e-5)
    assert late == pytest.approx(float(scalefl_loss(z, y, 1.0, 3.0, True)), rel=1e-5) and late > early


def test_width_scaling_rejects_the_transformer(tiny_een: EarlyExitNet) -> None:
    alg = ScaleFL(cfg_for("transformer4", width=16, dataset="agnews"))
    with pytest.raises(ValueError, match=r"scalefl: width_factor=0.5 < 1 needs a CNN"):
        alg.scaled_model(tiny_een, 0.5, (64,))


def test_width_factor_must_be_a_fraction(tiny_een: EarlyExitNet) -> None:
    with pytest.raises(ValueError, match=r"width_factor must be in \(0, 1\], got 0.0"):
        ScaleFL(cfg_for()).submodel(tiny_een, digits_data(), ctx_with(0, 0.0, None))


def test_device_profiles_carry_width_factors(tmp_path) -> None:
    tiers = {p.name: p.width_factor for p, _ in CATALOGS["iot_mix"].tiers}
    assert tiers == {"phone": 0.75, "single_board": 0.5, "edge_gpu": 1.0}
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"devices": [{"computation": 1, "communication": 10, "width_factor": 0.25}, {"computation": 1, "communication": 10}]}))
    assert [p.width_factor for p, _ in load_trace(trace).tiers] == [0.25, 1.0]
    trace.write_text(json.dumps({"devices": [{"computation": 1, "communication": 10, "width_factor": 1.5}]}))
    with pytest.raises(ValueError, match=r"devices\[0\] width_factor must be in \(0, 1\], got 1.5"):
        load_trace(trace)


def test_learns_on_digits_with_scaled_devices(tmp_path) -> None:
    summary = run_digits(tmp_path, "scalefl", "profiles.catalog=iot_mix")
    assert summary["acc_avg_exit"] > LEARNS
    run_dir = next((tmp_path / "runs").iterdir())
    seen = {(r["profile"], r["width"], r["depth"]) for r in rundir.read_jsonl(run_dir / "clients.jsonl") if r["status"] == "ok"}
    assert seen == {("phone", 6.0, 3.0), ("single_board", 4.0, 2.0), ("edge_gpu", 8.0, 3.0)}
