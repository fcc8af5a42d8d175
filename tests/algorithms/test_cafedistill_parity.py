"""CAFEDistill under its defaults: each component's promise, and the baselines given the same heads.

The option tests in test_cafedistill_options.py pin personal heads; these run the
defaults (``heads: generic_residual``, residual CE into the backbone, residuals on
the received generic heads) so that what the docs say of the defaults is what runs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cafe_ray.algorithms.base import ClientResult, global_params
from cafe_ray.algorithms.cafedistill import CafeDistill
from cafe_ray.algorithms.cafedistill.algorithm import TEACHER_B, TEACHER_W
from cafe_ray.algorithms.cafedistill.teacher import pack_head
from cafe_ray.algorithms.fedper import FedPerEE
from cafe_ray.algorithms.fedrep import FedRepEE
from cafe_ray.algorithms.fedrod import FedRoDEE
from cafe_ray.algorithms.heads import PRIOR_FLOOR, final_linear_keys
from cafe_ray.algorithms.interference import exit_gradient_cosines, stage_parameters
from cafe_ray.config import build_config
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx, run_rounds
from tests.conftest import make_tiny_een

PARTS = [(0, 1, 2, 3), (1, 3), (0, 2, 3)]


def defaults(num_clients: int = 4, **hp: object) -> CafeDistill:
    """CAFEDistill with its defaults (only ``hp`` changed)."""
    cfg = make_cfg("cafedistill", cafedistill=dict(hp))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_clients": num_clients})})
    return CafeDistill(cfg)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def one_update(alg: CafeDistill, model: EarlyExitNet, data, participants=(0, 1), t: int = 3, T: int = 6):
    """A state after ``t`` rounds, then client 0's update of round t (its output and the trained model)."""
    state, personal = run_rounds(alg, model, data, t, participants=[participants] * t)
    payload = alg.server_payloads(state, round_ctx(t, T, participants))[0]
    m = copy.deepcopy(model)
    out = alg.client_update(m, payload, personal.get(0), data[0], client_ctx(0, t, T))
    return state, payload, out, m


# ------------------------------------------------------------------ the defaults
def test_the_defaults_are_what_the_docs_say() -> None:
    hp = build_config({"algorithm": {"name": "cafedistill"}}).algorithm.cafedistill
    assert (hp.heads, hp.residual_init, hp.residual_ce, hp.residual_generic) == (
        "generic_residual", "prior", "backbone", "received_ce")
    assert (hp.lam, hp.unselected, hp.teacher, hp.teacher_distance) == (1.0, "ce_detached", "qp", "head")


def test_the_defaults_train_end_to_end_with_kd() -> None:
    """The defaults themselves (no option changed): KD is on once a trained teacher exists."""
    model, data = make_tiny_een(), make_clients(4)
    alg = defaults()
    state, personal = run_rounds(alg, model, data, 4, participants=PARTS + [(0, 1, 2, 3)])
    payload = alg.server_payloads(state, round_ctx(4, 6, (0,)))[0]
    out = alg.client_update(copy.deepcopy(model), payload, personal[0], data[0], client_ctx(0, 4, 6))
    assert out.metrics["kd_lam"] > 0 and out.metrics["num_students"] >= 1
    assert sorted(out.personal) == sorted(f"phead.{k}.{p}" for k in range(3) for p in ("weight", "bias"))


# --------------------------------------------------- baseline parity: FedRoD-EE
def test_defaults_without_distillation_are_fedrod_with_the_same_heads_bit_for_bit() -> None:
    """lam = 0 under the defaults is FedRoD-EE with prior-initialised personal heads whose CE reaches
    the backbone and is fitted on the received generic heads: the same network, to the last bit."""
    model, data = make_tiny_een(), make_clients(4)
    cd = defaults(lam=0.0)
    fr = FedRoDEE(make_cfg("fedrod_ee", fedrod={"personal_init": "prior", "personal_ce": "backbone",
                                                "personal_generic": "received"}))
    s_cd, p_cd = run_rounds(cd, model, data, 3, participants=PARTS)
    s_fr, p_fr = run_rounds(fr, model, data, 3, participants=PARTS)
    assert_same(global_params(s_fr), global_params(s_cd))
    assert sorted(p_cd) == sorted(p_fr)
    for cid in p_fr:
        assert_same(p_fr[cid], p_cd[cid])


@pytest.mark.parametrize(("ce", "generic"), [("backbone", "live"), ("detached", "received"), ("backbone", "received")])
def test_fedrod_personal_ce_options_change_training(ce: str, generic: str) -> None:
    model, data = make_tiny_een(), make_clients(4)
    plain = FedRoDEE(make_cfg("fedrod_ee"))
    opt = FedRoDEE(make_cfg("fedrod_ee", fedrod={"personal_ce": ce, "personal_generic": generic}))
    s0, _ = run_rounds(plain, model, data, 2)
    s1, _ = run_rounds(opt, model, data, 2)
    backbone = [k for k in global_params(s0) if k.startswith("stages.")]
    moved = [k for k in backbone if not torch.equal(global_params(s0)[k], global_params(s1)[k])]
    assert bool(moved) == (ce == "backbone")  # only a personal CE into the backbone changes the backbone


def test_fedrod_rejects_an_unknown_personal_ce() -> None:
    from cafe_ray.config import ConfigError

    with pytest.raises(ConfigError, match="fedrod.personal_ce"):
        build_config({"algorithm": {"name": "fedrod_ee", "fedrod": {"personal_ce": "sideways"}}}, "x")


@pytest.mark.parametrize("cls", [FedPerEE, FedRepEE])
def test_prior_head_init_adds_the_log_prior_at_the_first_visit_only(cls: type) -> None:
    section = "fedper" if cls is FedPerEE else "fedrep"
    model, data = make_tiny_een(), make_clients(2)
    shared = cls(make_cfg(cls.name))
    prior = cls(make_cfg(cls.name, **{section: {"head_init": "prior"}}))
    counts = torch.bincount(data[0].y_train, minlength=4).float()
    want = (counts / counts.sum()).clamp_min(PRIOR_FLOOR).log()
    state = prior.init_server_state(copy.deepcopy(model))
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    payload = prior.server_payloads(state, round_ctx(0, 3, (0,)))[0]
    shared.client_start(m0, payload, None, data[0], client_ctx(0, 0, 3))
    prior.client_start(m1, payload, None, data[0], client_ctx(0, 0, 3))
    for k in range(model.num_exits):
        _, bk = final_linear_keys(model, k)
        torch.testing.assert_close(m1.state_dict()[bk] - m0.state_dict()[bk], want)
    out = prior.client_update(copy.deepcopy(model), payload, None, data[0], client_ctx(0, 0, 3))
    m2 = copy.deepcopy(model)
    prior.client_start(m2, payload, out.personal, data[0], client_ctx(0, 1, 3))  # a later visit: its own heads
    for k, v in out.personal.items():
        assert torch.equal(m2.state_dict()[k], v), k


# ---------------------------------------------------------- unselected exits
def test_under_the_defaults_an_unselected_exit_still_trains_the_backbone() -> None:
    """ce_detached under residual_ce backbone: S_i changes no gradient but KD's (what the docs say)."""
    model, data = make_tiny_een(), make_clients(2)
    a = defaults(num_clients=2, lam=0.0)
    b = defaults(num_clients=2, lam=0.0, selection={"schedule": "all"})
    _, pa, oa, _ = one_update(a, model, data, t=1, T=20)
    _, pb, ob, _ = one_update(b, model, data, t=1, T=20)
    assert pa.meta["students"] != pb.meta["students"]  # different S_i ...
    assert_same(oa.upload.tensors, ob.upload.tensors)  # ... and, without KD, the same training
    assert_same(oa.personal, ob.personal)


def test_excluded_unselected_exits_send_no_gradient_anywhere() -> None:
    model, data = make_tiny_een(), make_clients(2)
    alg = defaults(num_clients=2, unselected="excluded", selection={"schedule_clock": "global", "ramp": 1.0})
    state, payload, out, _ = one_update(alg, model, data, t=1, T=20)
    assert payload.meta["students"] == []  # R(2) = 2/20: no student yet
    received = global_params(state)
    for k in range(model.num_exits - 1):  # the students' generic and residual heads do not move
        for key in final_linear_keys(model, k):
            assert torch.equal(out.upload.tensors[key], received[key]), key
    assert out.upload.meta["trained_exits"] == [model.num_exits - 1]
    wk, _ = final_linear_keys(model, model.num_exits - 1)
    assert not torch.equal(out.upload.tensors[wk], received[wk])  # the teacher exit trains


def test_excluded_exits_are_averaged_over_the_clients_that_trained_them() -> None:
    model = make_tiny_een()
    alg = defaults(num_clients=3, unselected="excluded")
    state = alg.init_server_state(copy.deepcopy(model))
    old = global_params(state)
    wk, _ = final_linear_keys(model, 0)

    def result(cid: int, trained: list[int], shift: float) -> ClientResult:
        up = {k: v + shift for k, v in old.items()}
        up[wk] = old[wk] if 0 not in trained else up[wk]
        from cafe_ray.algorithms.base import ClientOutput, Message
        from cafe_ray.algorithms.cafedistill.algorithm import HEAD_B, HEAD_W

        up[HEAD_W], up[HEAD_B] = model.last_head.weight.detach(), model.last_head.bias.detach()
        return ClientResult(cid, ClientOutput(Message(up, {"trained_exits": trained}), None, 10, 10, 3))

    res = [result(0, [0, 2], 1.0), result(1, [2], 3.0)]
    new = global_params(alg.aggregate(state, res, round_ctx(0, 5, (0, 1))))
    torch.testing.assert_close(new[wk], old[wk] + 1.0)  # exit 0: client 0 alone trained it
    torch.testing.assert_close(new["stages.0.0.weight"], old["stages.0.0.weight"] + 2.0)  # backbone: both
    res = [result(0, [2], 1.0), result(1, [2], 3.0)]
    new = global_params(alg.aggregate(state, res, round_ctx(0, 5, (0, 1))))
    assert torch.equal(new[wk], old[wk])  # nobody trained exit 0: it keeps its head


def test_excluded_equals_frozen_with_personal_heads() -> None:
    model, data = make_tiny_een(), make_clients(4)
    a = defaults(heads="personal", unselected="frozen")
    b = defaults(heads="personal", unselected="excluded")
    sa, pa = run_rounds(a, model, data, 3, participants=PARTS)
    sb, pb = run_rounds(b, model, data, 3, participants=PARTS)
    assert_same(global_params(sa), global_params(sb))
    for cid in pa:
        assert_same(pa[cid], pb[cid])


# ------------------------------------------------------------------- teachers
@pytest.mark.parametrize("kind", ["uniform", "own"])
def test_teacher_ablations_send_the_pool_mean_or_the_own_head(kind: str) -> None:
    model, data = make_tiny_een(), make_clients(3)
    alg = defaults(num_clients=3, teacher=kind)
    state, _ = run_rounds(alg, model, data, 2, participants=[(0, 1, 2), (0, 1, 2)])
    heads = {c: (state.tensors[f"heads/{c}/weight"], state.tensors[f"heads/{c}/bias"]) for c in range(3)}
    payload = alg.server_payloads(state, round_ctx(2, 5, (0, 1)))
    for cid in (0, 1):
        if kind == "own":
            want_w, want_b = heads[cid]
        else:
            want_w = sum(h[0].double() for h in heads.values()) / 3
            want_b = sum(h[1].double() for h in heads.values()) / 3
        torch.testing.assert_close(payload[cid].tensors[TEACHER_W].double(), want_w.double())
        torch.testing.assert_close(payload[cid].tensors[TEACHER_B].double(), want_b.double())


def test_weights_distance_ignores_the_bias() -> None:
    """Two heads that differ only in their bias (the label prior) are the same teacher under weights."""
    model = make_tiny_een()
    alg_w = defaults(num_clients=3, teacher_distance="weights", center_heads=False, mu=0.05)
    alg_h = defaults(num_clients=3, teacher_distance="head", center_heads=False, mu=0.05)
    w = model.last_head.weight.detach()
    H = np.stack([pack_head(w, torch.tensor([5.0, -5.0, 0.0, 0.0])), pack_head(w, torch.tensor([-5.0, 5.0, 0.0, 0.0])),
                  pack_head(-w, torch.zeros(4))])
    init_w, init_b = torch.zeros_like(w), torch.zeros(4)
    ww = alg_w._mixing_weights(H, [0], init_w, init_b)
    wh = alg_h._mixing_weights(H, [0], init_w, init_b)
    assert ww[0, 1] == pytest.approx(ww[0, 0]) and ww[0, 2] < ww[0, 0]
    assert wh[0, 1] < wh[0, 0]  # the whole head tells the priors apart


# --------------------------------------------------------------- interference
def test_gradient_cosines_on_crafted_losses() -> None:
    model = make_tiny_een()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    z = model(x)
    base = z[0].pow(2).mean()
    out = exit_gradient_cosines([base, 2.0 * base, -base], stage_parameters(model))
    assert out["grad_cos_0_1"] == pytest.approx(1.0) and out["grad_cos_0_2"] == pytest.approx(-1.0)
    assert out["grad_cos_1_2"] == pytest.approx(-1.0)  # exit 0's loss reaches stage 0 only: the rest is 0


@pytest.mark.parametrize("heads", ["personal", "generic_residual"])
def test_measuring_interference_changes_no_training(heads: str) -> None:
    model, data = make_tiny_een(), make_clients(2)
    _, _, off, _ = one_update(defaults(num_clients=2, heads=heads), model, data)
    _, _, on, _ = one_update(defaults(num_clients=2, heads=heads, measure_interference=True), model, data)
    assert_same(off.upload.tensors, on.upload.tensors)
    assert_same(off.personal, on.personal)
    assert {"grad_cos_0_1", "grad_cos_0_2", "grad_cos_1_2"} <= set(on.metrics)
    assert all(-1.0 <= on.metrics[k] <= 1.0 for k in on.metrics if k.startswith("grad_cos"))


# --------------------------------------------------------------- exit-level KD gate
@pytest.mark.parametrize("heads", ["personal", "generic_residual"])
def test_teacher_better_gate_skips_kd_toward_a_weaker_teacher(heads: str) -> None:
    """A teacher that gets every training sample wrong distils nothing: the update is lambda 0's."""
    from cafe_ray.algorithms.base import Message

    model, data = make_tiny_een(), make_clients(2)
    alg = defaults(num_clients=2, heads=heads, kd_exit_gate="teacher_better", kd_gate="none")
    state, personal = run_rounds(alg, model, data, 3, participants=[(0, 1)] * 3)
    payload = alg.server_payloads(state, round_ctx(3, 6, (0, 1)))[0]
    assert payload.meta["lam"] > 0 and payload.meta["students"]
    w = torch.zeros_like(payload.tensors[TEACHER_W])
    b = torch.full_like(payload.tensors[TEACHER_B], -10.0)
    b[3] = 10.0  # always class 3, which client 0 never sees (its classes are 0 and 1)
    bad = Message({**payload.tensors, TEACHER_W: w, TEACHER_B: b}, dict(payload.meta))
    off = Message(bad.tensors, {**payload.meta, "lam": 0.0})
    out = alg.client_update(copy.deepcopy(model), bad, personal[0], data[0], client_ctx(0, 3, 6))
    ref = alg.client_update(copy.deepcopy(model), off, personal[0], data[0], client_ctx(0, 3, 6))
    assert out.metrics["kd_exits"] == 0.0
    assert_same(out.personal, ref.personal)
    good = alg.client_update(copy.deepcopy(model), payload, personal[0], data[0], client_ctx(0, 3, 6))
    assert 0 <= good.metrics["kd_exits"] <= len(payload.meta["students"])
