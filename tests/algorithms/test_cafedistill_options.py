"""CAFEDistill's named options (algorithm.cafedistill.*), each exercised for real."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cafe_ray.algorithms.base import ClientResult, Message, global_params
from cafe_ray.algorithms.cafedistill import (
    CafeDistill,
    cosine_distances,
    teacher_weights,
)
from cafe_ray.algorithms.cafedistill.algorithm import HEAD_B, HEAD_W, TEACHER_B, TEACHER_W
from cafe_ray.algorithms.cafedistill.loss import (
    KDOptions,
    gate_mask,
    kd_per_sample,
    label_prior,
    make_loss_fn,
    scale_grad,
    target_views,
)
from cafe_ray.algorithms.cafedistill.selection import CountSketch, cosine, loo_sketch_scores
from cafe_ray.algorithms.fedper import FedPerEE
from cafe_ray.config import CAFEDISTILL_SPEC_PRESET, build_config
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx, run_rounds
from tests.conftest import make_tiny_een


def cafe(train: dict | None = None, num_clients: int = 10, **hp: object) -> CafeDistill:
    cfg = make_cfg("cafedistill", train=train, cafedistill={"heads": "personal", **hp})  # personal-head mechanics
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_clients": num_clients})})
    return CafeDistill(cfg)


def batch(n: int = 16, in_dim: int = 8, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def teacher(model: EarlyExitNet, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = model.last_head.weight
    return torch.randn(w.shape, generator=g), torch.randn(w.shape[0], generator=g)


def grads(model: EarlyExitNet, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def loss_grads(model: EarlyExitNet, opts: KDOptions, students=(0, 1), **kw) -> dict[str, torch.Tensor]:
    x, y = batch()
    w, b = teacher(model)
    m = copy.deepcopy(model)
    return grads(m, make_loss_fn(w, b, students, opts, **kw)(m, x, y))


# ------------------------------------------------------------------ preset
def test_spec_preset_restores_the_specification_and_explicit_fields_win() -> None:
    spec = build_config({"algorithm": {"cafedistill": {"preset": "spec", "tau": 2.0,
                                                       "selection": {"schedule": "all"}}}}).algorithm.cafedistill
    assert (spec.lam, spec.tau, spec.mu) == (1.0, 2.0, 0.5)
    for key, value in CAFEDISTILL_SPEC_PRESET.items():
        if key not in ("tau", "selection"):
            assert getattr(spec, key) == value, key
    assert spec.selection.similarity == "update_cosine" and spec.selection.schedule == "all"
    default = build_config({}).algorithm.cafedistill
    assert default.preset == "default"
    assert default.model_dump() != spec.model_dump()


# ------------------------------------------------------------ kd_backbone
def test_detach_gives_exactly_zero_backbone_gradient_from_kd(tiny_een: EarlyExitNet) -> None:
    ce = loss_grads(tiny_een, KDOptions(lam=0.0, tau=3.0, backbone="detach"))
    kd = loss_grads(tiny_een, KDOptions(lam=5.0, tau=3.0, backbone="detach"))
    for k in tiny_een.backbone_keys():
        if k.endswith(("weight", "bias")):
            assert torch.equal(ce[k], kd[k]), k  # the KD term adds exactly nothing to the backbone
    assert not torch.equal(ce["exits.0.weight"], kd["exits.0.weight"])  # ... but trains the student head
    full = loss_grads(tiny_een, KDOptions(lam=5.0, tau=3.0, backbone="full"))
    assert not torch.equal(ce["stages.0.0.weight"], full["stages.0.0.weight"])
    torch.testing.assert_close(full["exits.0.weight"], kd["exits.0.weight"])  # same head gradient


def test_scaled_multiplies_the_backbone_kd_gradient(tiny_een: EarlyExitNet) -> None:
    ce = loss_grads(tiny_een, KDOptions(lam=0.0, tau=3.0))
    full = loss_grads(tiny_een, KDOptions(lam=2.0, tau=3.0))
    scaled = loss_grads(tiny_een, KDOptions(lam=2.0, tau=3.0, backbone="scaled", backbone_scale=0.25))
    for k in ("stages.0.0.weight", "stages.1.0.bias"):
        torch.testing.assert_close(scaled[k] - ce[k], 0.25 * (full[k] - ce[k]), rtol=1e-4, atol=1e-6)
    h = torch.randn(3, 4, requires_grad=True)
    assert torch.equal(scale_grad(h, 0.3), h)  # forward value bit for bit


# ------------------------------------------------------------ unselected
def test_ce_detached_moves_unselected_heads_without_touching_the_backbone(tiny_een: EarlyExitNet) -> None:
    frozen = loss_grads(tiny_een, KDOptions(lam=0.0, tau=3.0, unselected="frozen"), students=(1,))
    ce_det = loss_grads(tiny_een, KDOptions(lam=0.0, tau=3.0, unselected="ce_detached"), students=(1,))
    assert float(frozen["exits.0.weight"].abs().sum()) == 0.0
    assert float(ce_det["exits.0.weight"].abs().sum()) > 0.0
    for k in tiny_een.backbone_keys():
        if k.endswith(("weight", "bias")):
            assert torch.equal(frozen[k], ce_det[k]), k


def test_client_update_trains_unselected_heads_only_with_ce_detached(tiny_een: EarlyExitNet) -> None:
    data = make_clients(1)[0]
    for mode, moves in (("frozen", False), ("ce_detached", True)):
        alg = cafe(unselected=mode)
        state = alg.init_server_state(copy.deepcopy(tiny_een))
        payload = alg.server_payloads(state, round_ctx(0, 10, (0,)))[0]
        payload = Message(tensors=payload.tensors, meta={**payload.meta, "students": [1]})
        out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data, client_ctx(0, 0, 10))
        changed = not torch.equal(out.personal["exits.0.weight"], tiny_een.state_dict()["exits.0.weight"])
        assert changed is moves, mode


# --------------------------------------------------------------- gating
def test_gate_masks_on_crafted_logits() -> None:
    y = torch.tensor([0, 1, 2, 0])
    t = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 0.1, 0]])  # right, wrong, right, wrong
    s = torch.tensor([[9.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])
    assert gate_mask("none", s, t, y).tolist() == [1, 1, 1, 1]
    assert gate_mask("teacher_correct", s, t, y).tolist() == [1, 0, 1, 0]
    # teacher's p(y) vs student's p(y): 0.987<0.9998, 0.0063<0.576, 0.987>0.576, 0.3222<0.3333
    assert gate_mask("teacher_confident", s, t, y).tolist() == [0, 0, 1, 0]


def test_gated_samples_add_no_kd(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    w, b = teacher(tiny_een)
    with torch.no_grad():
        logits, phi = tiny_een.forward_with_features(x)
        zbar = F.linear(phi, w, b)
        mask = gate_mask("teacher_correct", logits[0], zbar, y)
        expected = 2.0 * float((kd_per_sample(logits[0], zbar, 3.0) * mask).sum() / len(y))
        ce = sum(float(F.cross_entropy(logits[k], y)) for k in (0, 2))
        loss = make_loss_fn(w, b, (0,), KDOptions(lam=2.0, tau=3.0, gate="teacher_correct"))(tiny_een, x, y)
    assert 0 < float(mask.sum()) < len(y)  # the test covers both kept and dropped samples
    assert float(loss) == pytest.approx(ce + expected, rel=1e-5)


# -------------------------------------------------------- label-aware target
def test_own_classes_kl_ignores_the_teacher_on_foreign_classes() -> None:
    prior = label_prior(torch.tensor([0, 0, 2, 2, 2]), 4)  # own classes {0, 2}
    s = torch.tensor([[1.0, 3.0, 0.0, -1.0]])
    t1 = torch.tensor([[2.0, 9.0, 1.0, 0.0]])
    t2 = torch.tensor([[2.0, -5.0, 1.0, 7.0]])  # differs only on the foreign classes 1 and 3
    kl = [float(kd_per_sample(*target_views("own_classes", s, t, prior), 1.0)) for t in (t1, t2)]
    assert kl[0] == pytest.approx(kl[1], abs=1e-7)
    p_t = F.softmax(torch.tensor([2.0, 1.0]), 0)
    p_s = F.softmax(torch.tensor([1.0, 0.0]), 0)
    assert kl[0] == pytest.approx(float((p_t * (p_t / p_s).log()).sum()), rel=1e-6)
    full = [float(kd_per_sample(s, t, 1.0)) for t in (t1, t2)]
    assert full[0] != pytest.approx(full[1])


def test_prior_corrected_teacher_adds_the_log_label_prior() -> None:
    prior = label_prior(torch.tensor([0, 0, 0, 1]), 3)  # (0.75, 0.25, 0)
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    sv, tv = target_views("prior_corrected", s, t, prior)
    assert torch.equal(sv, s)
    torch.testing.assert_close(tv - t, torch.tensor([0.75, 0.25, 1e-4]).log().expand(2, 3))


# ------------------------------------------------------------ centred heads
def test_centred_distances_see_what_training_changed() -> None:
    rng = np.random.default_rng(0)
    init = rng.normal(size=20) * 10.0  # a large shared initial head
    deltas = np.array([[1.0] * 10 + [0.0] * 10, [1.0] * 10 + [0.0] * 10, [0.0] * 10 + [1.0] * 10])
    H = init[None, :] + deltas
    raw = cosine_distances(H)
    centred = cosine_distances(H, center=init)
    assert raw.max() < 0.02  # the shared init dominates: all heads look alike
    np.testing.assert_allclose(centred, [[0, 0, 1], [0, 0, 1], [1, 1, 0]], atol=1e-12)
    W = teacher_weights(H, mu=0.5, center=init)
    assert W[0, 2] < W[0, 1] and W[2, 2] > 0.5


# ------------------------------------------------------------- warm-up
def _stored_state(alg: CafeDistill, model: EarlyExitNet, rounds: int = 1, clients: int = 3):
    state, _ = run_rounds(alg, model, make_clients(clients), rounds)
    return state


def test_no_kd_without_trained_teacher_heads(tiny_een: EarlyExitNet) -> None:
    alg = cafe(lam=1.0, kd_warmup="none")
    state = alg.init_server_state(copy.deepcopy(tiny_een))
    assert alg.kd_weights(state, round_ctx(0, 10, (0, 1))) == {0: 0.0, 1: 0.0}
    spec = cafe(preset="spec")
    assert spec.kd_weights(state, round_ctx(0, 10, (0, 1))) == {0: 1.0, 1: 1.0}  # the spec distils from init
    trained = _stored_state(alg, tiny_een)
    assert alg.kd_weights(trained, round_ctx(1, 10, (0, 1))) == {0: 1.0, 1: 1.0}


def test_kd_warmup_follows_progress_or_starts_at_a_round(tiny_een: EarlyExitNet) -> None:
    prog = cafe(lam=0.5, kd_warmup="progress", selection={"ramp": 0.5, "schedule_clock": "global"})
    state = _stored_state(prog, tiny_een)
    assert prog.kd_weights(state, round_ctx(1, 10, (0,)))[0] == pytest.approx(0.5 * 0.4)  # R(2) = 4/10
    assert prog.kd_weights(state, round_ctx(7, 10, (0,)))[0] == pytest.approx(0.5)
    late = cafe(lam=0.5, kd_warmup="round", kd_start_round=4)
    assert late.kd_weights(state, round_ctx(3, 10, (0,)))[0] == 0.0
    assert late.kd_weights(state, round_ctx(4, 10, (0,)))[0] == 0.5
    payload = prog.server_payloads(state, round_ctx(1, 10, (0,)))[0]
    assert payload.meta["lam"] == pytest.approx(0.2)
    out = prog.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 1, 10))
    assert out.metrics["kd_lam"] == pytest.approx(0.2)


# ---------------------------------------------------------- live own head
def test_live_own_head_splits_hbar_into_others_plus_own_weight(tiny_een: EarlyExitNet) -> None:
    stored = cafe(own_head="stored", mu=2.0)
    live = cafe(own_head="live", mu=2.0)
    state = _stored_state(stored, tiny_een)
    full = stored.teacher_messages(state, (0, 1, 2))
    split = live.teacher_messages(state, (0, 1, 2))
    for cid in (0, 1, 2):
        w, b, own = split[cid]
        assert 0.0 < own < 1.0 and full[cid][2] == 0.0
        hw, hb = state.tensors[f"heads/{cid}/weight"], state.tensors[f"heads/{cid}/bias"]
        torch.testing.assert_close(w + own * hw, full[cid][0])
        torch.testing.assert_close(b + own * hb, full[cid][1])
    payload = live.server_payloads(state, round_ctx(1, 10, (0, 1, 2)))[0]
    assert payload.nbytes == stored.server_payloads(state, round_ctx(1, 10, (0, 1, 2)))[0].nbytes  # same traffic
    assert payload.meta["own_weight"] == pytest.approx(split[0][2])


def test_live_own_head_reads_the_clients_current_head(tiny_een: EarlyExitNet) -> None:
    x, y = batch()
    w, b = teacher(tiny_een)
    fn = make_loss_fn(w, b, (0,), KDOptions(lam=1.0, tau=3.0), own_weight=0.5)
    other = copy.deepcopy(tiny_een)
    with torch.no_grad():
        other.last_head.weight.mul_(3.0)  # a different live head, same student path
        base = float(fn(tiny_een, x, y)) - float(F.cross_entropy(tiny_een(x)[-1], y))
        moved = float(fn(other, x, y)) - float(F.cross_entropy(other(x)[-1], y))
    assert base != pytest.approx(moved)


# ------------------------------------------------------- conflict sketch
def test_count_sketch_keeps_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, generator=g)
    b = 0.6 * a + 0.8 * torch.randn(5000, generator=g)
    sk = CountSketch(5000, 1024, seed=1)
    assert cosine(sk(a), sk(b)) == pytest.approx(cosine(a, b), abs=0.08)
    a64, b64 = a.double(), b.double()
    torch.testing.assert_close(sk(a64 + b64), sk(a64) + sk(b64))  # linear


def test_leave_one_out_scores_exclude_the_own_update() -> None:
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sketches = {0: [e0], 1: [e0], 2: [e1]}
    scores = loo_sketch_scores(sketches, {0: 1.0, 1: 1.0, 2: 1.0})
    assert scores[0] == pytest.approx([1 / np.sqrt(2)])  # vs e0 + e1, not vs 2*e0 + e1
    assert scores[2] == pytest.approx([0.0])  # the others all point along e0
    assert loo_sketch_scores({0: [e0]}, {0: 1.0}) == {}


def _proxy_bytes(state) -> int:
    """Server-state bytes outside the teacher pool (heads/<cid>, one head per client by definition)."""
    return sum(v.numel() * v.element_size() for k, v in state.tensors.items() if not k.startswith("heads/"))


@pytest.mark.parametrize("similarity", ["update_sketch", "update_cosine"])
def test_sketch_keeps_server_state_constant_in_registered_clients(tiny_een: EarlyExitNet, similarity: str) -> None:
    sizes = []
    for clients in (3, 6):
        alg = cafe(num_clients=clients, selection={"similarity": similarity, "sketch_dim": 16})
        state, _ = run_rounds(alg, tiny_een, make_clients(clients), 2)
        sizes.append(_proxy_bytes(state))
        if similarity == "update_sketch":
            assert sorted(state.meta["conflict"]) == [str(c) for c in range(clients)]
            assert all(len(v) == tiny_een.num_exits - 1 for v in state.meta["conflict"].values())
    if similarity == "update_sketch":
        assert sizes[0] == sizes[1]
    else:
        assert sizes[1] > sizes[0]  # the spec's proxy grows with every registered client's full update


def test_sketch_scores_drive_tier_two(tiny_een: EarlyExitNet) -> None:
    alg = cafe(selection={"similarity": "update_sketch", "ramp": 0.5, "schedule_clock": "global"})
    state = alg.init_server_state(copy.deepcopy(tiny_een))
    meta = {**state.meta, "conflict": {"0": [-0.9, 0.0], "1": [0.8, 0.0], "2": [0.1, 0.0]}}
    state = type(state)(tensors=state.tensors, meta=meta)
    # T=8, round 0: R=1/4, d=0, B=round(0.5*3)=2 slots for exit 0: the two highest exit-0 scores win
    students = alg.students(state, round_ctx(0, 8, (0, 1, 2)))
    assert students == {0: (), 1: (0,), 2: (0,)}


# -------------------------------------------------------- schedule clock
def test_client_clock_counts_the_clients_own_visits(tiny_een: EarlyExitNet) -> None:
    alg = cafe(num_clients=4, selection={"schedule_clock": "client", "ramp": 0.5})
    glob = cafe(num_clients=4, selection={"ramp": 0.5, "schedule_clock": "global"})
    state, _ = run_rounds(alg, tiny_een, make_clients(4), 2, participants=[(0, 1), (0, 2)])
    assert state.meta["visits"] == {"0": 2, "1": 1, "2": 1}
    clocks = alg.clocks(state, round_ctx(2, 10, (0, 3)))
    # V = T * n_t / n = 10 * 2 / 4 = 5 expected visits; R_0 = 2*3/5 -> capped at 1, R_3 = 2*1/5
    assert clocks == {0: (12, 20), 3: (4, 20)}
    assert glob.clocks(state, round_ctx(2, 10, (0, 3))) == {0: (3, 10), 3: (3, 10)}
    students = alg.students(state, round_ctx(2, 10, (0, 3)))
    assert students[0] == (0, 1) and len(students[3]) <= 1


def test_client_clock_equals_global_under_full_participation(tiny_een: EarlyExitNet) -> None:
    data = make_clients(3)
    a = cafe(num_clients=3, selection={"schedule_clock": "client"})
    b = cafe(num_clients=3, selection={"schedule_clock": "global"})
    sa, pa = run_rounds(a, tiny_een, data, 3)
    sb, pb = run_rounds(b, tiny_een, data, 3)
    for k, v in global_params(sa).items():
        assert torch.equal(v, global_params(sb)[k]), k


# --------------------------------------------------- regression: FedPer-EE
@pytest.mark.parametrize("unselected", ["frozen", "ce_detached"])
def test_plain_ce_configuration_equals_fedper_bit_for_bit(unselected: str) -> None:
    """lam=0 and schedule=all: CAFEDistill is FedPer-EE (docs/specification.md), to the last bit."""
    model = make_tiny_een()
    data = make_clients(4)
    parts = [(0, 1, 2, 3), (1, 3), (0, 2, 3)]
    cd = cafe(lam=0.0, unselected=unselected, kd_backbone="detach", selection={"schedule": "all"})
    fp = FedPerEE(make_cfg("fedper_ee"))
    s_cd, p_cd = run_rounds(cd, model, data, 3, participants=parts)
    s_fp, p_fp = run_rounds(fp, model, data, 3, participants=parts)
    for k, v in global_params(s_fp).items():
        assert torch.equal(v, global_params(s_cd)[k]), k
    assert sorted(p_cd) == sorted(p_fp)
    for cid in p_fp:
        assert sorted(p_cd[cid]) == sorted(p_fp[cid])
        for k, v in p_fp[cid].items():
            assert torch.equal(v, p_cd[cid][k]), (cid, k)


def test_plain_configuration_reports_the_same_loss_as_fedper(tiny_een: EarlyExitNet) -> None:
    data = make_clients(1)[0]
    cd = cafe(lam=0.0, selection={"schedule": "all"})
    fp = FedPerEE(make_cfg("fedper_ee"))
    state = cd.init_server_state(copy.deepcopy(tiny_een))
    out_cd = cd.client_update(copy.deepcopy(tiny_een), cd.server_payloads(state, round_ctx(0, 5, (0,)))[0],
                              None, data, client_ctx(0, 0, 5))
    out_fp = fp.client_update(copy.deepcopy(tiny_een), fp.server_payloads(fp.init_server_state(tiny_een),
                              round_ctx(0, 5, (0,)))[0], None, data, client_ctx(0, 0, 5))
    assert out_cd.metrics["train_loss"] == out_fp.metrics["train_loss"]
    assert out_cd.samples_processed == out_fp.samples_processed
    assert {HEAD_W, HEAD_B} <= set(out_cd.upload.tensors) and TEACHER_W not in out_cd.upload.tensors
    assert TEACHER_B not in out_cd.upload.tensors


def test_the_defaults_train_end_to_end(tiny_een: EarlyExitNet) -> None:
    """CafeDistill exactly as configured by default (generic + residual heads), not the
    personal-head helper: four rounds, then one client's update distils (kd_lam > 0)."""
    cfg = make_cfg("cafedistill")
    alg = CafeDistill(cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_clients": 4})}))
    assert alg.hp == type(alg.hp)()  # every field at its default
    data = make_clients(4)
    state, personal = run_rounds(alg, tiny_een, data, 4, participants=[(0, 1, 2, 3), (0, 2), (1, 3), (0, 1, 2, 3)])
    assert sorted(personal) == [0, 1, 2, 3]
    res = [ClientResult(0, alg.client_update(copy.deepcopy(tiny_een),
                                             alg.server_payloads(state, round_ctx(4, 6, (0,)))[0],
                                             personal[0], data[0], client_ctx(0, 4, 6)))]
    assert res[0].output.metrics["kd_lam"] > 0 and 0.0 <= res[0].output.metrics["kd_kept"] <= 1.0


def test_default_heads_are_generic_plus_residual_and_the_spec_keeps_personal_heads() -> None:
    default = CafeDistill(make_cfg("cafedistill")).hp
    assert (default.heads, default.residual_init) == ("generic_residual", "prior")  # chosen on validation
    assert CafeDistill(make_cfg("cafedistill", cafedistill={"preset": "spec"})).hp.heads == "personal"


def test_ramp_shortens_the_progressive_phase(tiny_een: EarlyExitNet) -> None:
    state = cafe().init_server_state(copy.deepcopy(tiny_een))
    assert cafe().hp.selection.ramp == 0.25  # the chosen default
    spec = cafe(selection={"ramp": 0.5, "schedule_clock": "global"})
    short = cafe(selection={"ramp": 0.25, "schedule_clock": "global"})
    assert spec.clocks(state, round_ctx(1, 20, (0,))) == {0: (2, 20)}  # R = 2*2/20
    (t, T), = short.clocks(state, round_ctx(1, 20, (0,))).values()
    assert t / T == pytest.approx(2 / 10)  # 2t/T' = 2*2000 / (20*500): R = t / (0.25 T) = 0.4
    plan = short.plan(state, round_ctx(1, 20, (0,)))
    assert abs(plan.R - 0.4) < 1e-12
    students = short.students(state, round_ctx(4, 20, (0, 1)))
    assert students == {0: (0, 1), 1: (0, 1)}  # t=5 >= 0.25*20: R = 1, every student
    assert spec.students(state, round_ctx(4, 20, (0, 1))) != students


# ------------------------------------------- heads: generic_residual (FedRoD form)
@pytest.mark.parametrize("unselected", ["frozen", "ce_detached"])
def test_generic_residual_without_kd_equals_fedrod_bit_for_bit(unselected: str) -> None:
    """lam=0, schedule=all, residual_ce=detached, residual_generic=live: CAFEDistill on generic +
    residual heads is FedRoD-EE, to the last bit."""
    from cafe_ray.algorithms.fedrod import FedRoDEE

    model = make_tiny_een()
    data = make_clients(4)
    parts = [(0, 1, 2, 3), (1, 3), (0, 2, 3)]
    cd = cafe(heads="generic_residual", residual_init="zero", lam=0.0, unselected=unselected,
              residual_ce="detached", residual_generic="live", selection={"schedule": "all"})
    fr = FedRoDEE(make_cfg("fedrod_ee"))
    s_cd, p_cd = run_rounds(cd, model, data, 3, participants=parts)
    s_fr, p_fr = run_rounds(fr, model, data, 3, participants=parts)
    assert sorted(global_params(s_cd)) == sorted(global_params(s_fr)) == sorted(model.state_dict())
    for k, v in global_params(s_fr).items():
        assert torch.equal(v, global_params(s_cd)[k]), k
    for cid in p_fr:
        assert sorted(p_cd[cid]) == sorted(p_fr[cid])
        for k, v in p_fr[cid].items():
            assert torch.equal(v, p_cd[cid][k]), (cid, k)


def test_generic_residual_kd_moves_only_the_personal_heads(tiny_een: EarlyExitNet) -> None:
    from cafe_ray.algorithms.cafedistill.loss import make_residual_loss_fn
    from cafe_ray.algorithms.fedrod import residual_heads
    from cafe_ray.algorithms.heads import HeadProbe

    x, y = batch()
    counts = torch.bincount(y, minlength=4).float()
    w, b = teacher(tiny_een)

    def run(lam: float) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        model = copy.deepcopy(tiny_een)
        heads = residual_heads(model, None)
        opts = KDOptions(lam=lam, tau=3.0, unselected="ce_detached")
        loss = make_residual_loss_fn(HeadProbe(model), heads, counts, w, b, (0,), opts)(model, x, y)
        g = grads(model, loss)
        return g, [p.grad.clone() for pair in heads for p in pair]

    g0, h0 = run(0.0)
    g1, h1 = run(1.0)
    for n in g0:  # backbone and generic heads: the KD term adds exactly nothing
        assert torch.equal(g0[n], g1[n]), n
    assert not torch.equal(h0[0], h1[0])  # the student's residual head gets the KD gradient
    assert torch.equal(h0[2], h1[2]) and torch.equal(h0[4], h1[4])  # exit 1 (unselected) and the teacher do not


def test_generic_residual_uploads_the_personal_last_head_and_evaluates_summed_heads(tiny_een: EarlyExitNet) -> None:
    data = make_clients(2)
    alg = cafe(num_clients=2, heads="generic_residual", residual_generic="live")  # received: the test below
    state, personal = run_rounds(alg, tiny_een, data, 2)
    payload = alg.server_payloads(state, round_ctx(2, 3, (0,)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, personal[0], data[0], client_ctx(0, 2, 3))
    sd_keys = set(tiny_een.state_dict())
    assert sd_keys <= set(out.upload.tensors)  # generic heads are shared
    assert sorted(out.personal) == sorted(f"phead.{k}.{p}" for k in range(3) for p in ("weight", "bias"))
    expect_w = out.upload.tensors["exits.2.linear.weight" if "exits.2.linear.weight" in sd_keys else
                                  "exits.2.weight"] + out.personal["phead.2.weight"]
    torch.testing.assert_close(out.upload.tensors[HEAD_W], expect_w)
    model = copy.deepcopy(tiny_een)
    generic = {k: v for k, v in out.upload.tensors.items() if k in sd_keys}
    alg.load_for_eval(model, Message(tensors=generic), out.personal, data[0], client_ctx(0, 3, 3))
    torch.testing.assert_close(model.last_head.weight, expect_w)


@pytest.mark.parametrize("heads", ["personal", "generic_residual"])
def test_kd_last_exit_distils_the_teacher_exit_too(tiny_een: EarlyExitNet, heads: str) -> None:
    """kd_last_exit: the teacher exit's head gets a KD gradient, even with no student selected."""
    data = make_clients(1)
    grads_of: dict[bool, torch.Tensor] = {}
    for last in (False, True):
        alg = cafe(num_clients=1, heads=heads, kd_last_exit=last, kd_gate="none", kd_warmup="none",
                   kd_needs_trained_teacher=False, lam=1.0, selection={"schedule": "progressive", "ramp": 0.5})
        state = alg.init_server_state(copy.deepcopy(tiny_een))
        payload = alg.server_payloads(state, round_ctx(0, 100, (0,)))[0]
        assert payload.meta["students"] == []  # round 1 of 100: no student yet
        model = copy.deepcopy(tiny_een)
        out = alg.client_update(model, payload, None, data[0], client_ctx(0, 0, 100))
        assert (out.metrics["kd_loss"] > 0) == last
        grads_of[last] = out.upload.tensors[HEAD_W]
    assert not torch.equal(grads_of[False], grads_of[True])  # the last head moved differently


def test_prior_initialised_residuals_equal_fedrod_with_prior_init_without_kd() -> None:
    """residual_init=prior is FedRoD-EE's personal_init=prior when lam=0 and the personal CE is
    detached (bit for bit)."""
    from cafe_ray.algorithms.fedrod import FedRoDEE

    model = make_tiny_een()
    data = make_clients(3)
    cd = cafe(heads="generic_residual", residual_init="prior", lam=0.0, residual_ce="detached",
              residual_generic="live", selection={"schedule": "all"})
    fr = FedRoDEE(make_cfg("fedrod_ee", fedrod={"personal_init": "prior"}))
    _, p_cd = run_rounds(cd, model, data, 2)
    _, p_fr = run_rounds(fr, model, data, 2)
    for cid in p_fr:
        for k, v in p_fr[cid].items():
            assert torch.equal(v, p_cd[cid][k]), (cid, k)


def _residual_grads(model: EarlyExitNet, shared: str, lam: float, residual_ce: str = "detached",
                    residual_generic: str = "live", move_generic: bool = False,
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """(model grads, residual-head grads) of L_i under heads=generic_residual, student exit 0."""
    from cafe_ray.algorithms.cafedistill.loss import make_residual_loss_fn
    from cafe_ray.algorithms.fedrod import residual_heads
    from cafe_ray.algorithms.heads import HeadProbe

    x, y = batch()
    counts = torch.bincount(y, minlength=4).float()
    w, b = teacher(model)
    model = copy.deepcopy(model)
    heads = residual_heads(model, None)
    opts = KDOptions(lam=lam, tau=3.0, unselected="ce_detached", shared=shared, residual_ce=residual_ce,
                     residual_generic=residual_generic)
    probe = HeadProbe(model)
    loss_fn = make_residual_loss_fn(probe, heads, counts, w, b, (0,), opts)
    if move_generic:  # local training moved the generic heads after the loss was built
        with torch.no_grad():
            for lin in probe.linears:
                lin.weight.add_(0.3 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(5)))
    loss = loss_fn(model, x, y)
    g = grads(model, loss)
    g["loss"] = loss.detach()
    return g, [p.grad.clone() for pair in heads for p in pair]


@pytest.mark.parametrize("shared", ["personal", "generic"])
def test_kd_shared_reaches_the_student_generic_head_and_the_stages_under_it(tiny_een: EarlyExitNet, shared: str) -> None:
    """kd_shared: KD moves stage 0 and exit 0's generic head; deeper stages and heads get exactly nothing."""
    g0, _ = _residual_grads(tiny_een, shared, 0.0)
    g1, _ = _residual_grads(tiny_een, shared, 1.0)
    moved = {n for n in g0 if n != "loss" and not torch.equal(g0[n], g1[n])}
    assert moved, "the KD term must reach the shared stack"
    assert all(n.startswith(("stages.0.", "exits.0.")) for n in moved), moved
    assert any(n.startswith("stages.0.") for n in moved) and any(n.startswith("exits.0.") for n in moved)


def test_kd_shared_generic_adds_a_term_that_leaves_the_residual_heads_alone(tiny_een: EarlyExitNet) -> None:
    """generic: the residual heads' gradients equal those of kd_shared none; the backbone's do not."""
    g_none, h_none = _residual_grads(tiny_een, "none", 1.0)
    g_gen, h_gen = _residual_grads(tiny_een, "generic", 1.0)
    for a, b in zip(h_none, h_gen, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(g_none[n], g_gen[n]) for n in g_none if n.startswith("stages.0."))


def test_kd_shared_needs_generic_residual_heads() -> None:
    from cafe_ray.config import ConfigError

    with pytest.raises(ConfigError, match="kd_shared='generic' needs heads: generic_residual"):
        build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"heads": "personal", "kd_shared": "generic"}}})
    assert build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"preset": "spec"}}}).algorithm.cafedistill.kd_shared == "none"


def test_residual_ce_backbone_trains_the_stages_never_the_generic_heads(tiny_een: EarlyExitNet) -> None:
    """residual_ce: backbone: the same loss value and the same generic-head and residual gradients as
    detached; only the backbone's gradients change (the personal CE now reaches them)."""
    g_det, h_det = _residual_grads(tiny_een, "none", 0.0)
    g_bb, h_bb = _residual_grads(tiny_een, "none", 0.0, residual_ce="backbone")
    assert torch.equal(g_det["loss"], g_bb["loss"])
    for a, b in zip(h_det, h_bb, strict=True):
        assert torch.equal(a, b)
    for n in g_det:
        if n.startswith("exits."):
            assert torch.equal(g_det[n], g_bb[n]), n
    changed = [n for n in g_det if n.startswith("stages.") and not torch.equal(g_det[n], g_bb[n])]
    assert changed and any(n.startswith("stages.0.") for n in changed)


def test_residual_ce_is_the_default_and_off_in_the_spec_preset() -> None:
    cafe = build_config({"algorithm": {"name": "cafedistill"}}).algorithm.cafedistill
    assert cafe.residual_ce == "backbone" and cafe.heads == "generic_residual" and cafe.lam == 1.0
    assert build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"preset": "spec"}}}
                        ).algorithm.cafedistill.residual_ce == "detached"
    with pytest.raises(ValueError, match="residual_ce"):
        KDOptions(lam=0.0, tau=1.0, residual_ce="both")


def test_residual_ce_backbone_keeps_kd_shared_none_on_the_residual_heads(tiny_een: EarlyExitNet) -> None:
    """With kd_shared none, KD moves only the residual heads also when the CE reaches the backbone."""
    g0, h0 = _residual_grads(tiny_een, "none", 0.0, residual_ce="backbone")
    g1, h1 = _residual_grads(tiny_een, "none", 1.0, residual_ce="backbone")
    assert all(torch.equal(g0[n], g1[n]) for n in g0 if n != "loss")
    assert any(not torch.equal(a, b) for a, b in zip(h0, h1, strict=True))


def test_residual_generic_received_matches_live_before_the_generic_heads_move(tiny_een: EarlyExitNet) -> None:
    """At the first step (live heads = received heads) both forms give the same loss and the same
    residual and backbone gradients; the generic heads' differ only where KD reached them (live)."""
    g_live, h_live = _residual_grads(tiny_een, "personal", 1.0, residual_ce="backbone")
    g_rec, h_rec = _residual_grads(tiny_een, "personal", 1.0, residual_ce="backbone", residual_generic="received")
    torch.testing.assert_close(g_live["loss"], g_rec["loss"])
    for a, b in zip(h_live, h_rec, strict=True):
        torch.testing.assert_close(a, b)
    for n in g_live:
        if n.startswith("stages."):
            torch.testing.assert_close(g_live[n], g_rec[n], msg=n)
    assert any(not torch.allclose(g_live[n], g_rec[n]) for n in g_live if n.startswith("exits.0."))


def test_residual_generic_received_leaves_the_generic_heads_to_bsm(tiny_een: EarlyExitNet) -> None:
    """received: KD (kd_shared personal) still reaches the stages under the student, never a generic head."""
    g0, _ = _residual_grads(tiny_een, "personal", 0.0, residual_ce="backbone", residual_generic="received")
    g1, _ = _residual_grads(tiny_een, "personal", 1.0, residual_ce="backbone", residual_generic="received")
    assert all(torch.equal(g0[n], g1[n]) for n in g0 if n.startswith("exits."))
    assert any(not torch.equal(g0[n], g1[n]) for n in g0 if n.startswith("stages.0."))


@pytest.mark.parametrize("residual_generic", ["live", "received", "received_ce"])
def test_residual_generic_received_ignores_the_locally_moved_generic_head(
        tiny_een: EarlyExitNet, residual_generic: str) -> None:
    """The residuals' gradient does not depend on where local training moved the generic heads under
    received (it corrects the head used at inference), and does under live."""
    _, h_still = _residual_grads(tiny_een, "none", 0.0, residual_generic=residual_generic)
    _, h_moved = _residual_grads(tiny_een, "none", 0.0, residual_generic=residual_generic, move_generic=True)
    same = all(torch.equal(a, b) for a, b in zip(h_still, h_moved, strict=True))
    assert same == (residual_generic != "live")


def test_residual_generic_received_ce_keeps_kd_on_the_live_generic_heads(tiny_een: EarlyExitNet) -> None:
    """received_ce: the personal CE is on the received heads, but KD (kd_shared personal) still reaches
    the student's generic head, exactly as under live."""
    g0, _ = _residual_grads(tiny_een, "personal", 0.0, residual_ce="backbone", residual_generic="received_ce")
    g1, _ = _residual_grads(tiny_een, "personal", 1.0, residual_ce="backbone", residual_generic="received_ce")
    moved = {n for n in g0 if n != "loss" and not torch.equal(g0[n], g1[n])}
    assert any(n.startswith("exits.0.") for n in moved) and any(n.startswith("stages.0.") for n in moved)
    assert all(n.startswith(("stages.0.", "exits.0.")) for n in moved), moved
    g_live, _ = _residual_grads(tiny_een, "personal", 1.0, residual_ce="backbone")
    for n in g1:
        if n.startswith("exits."):
            torch.testing.assert_close(g1[n], g_live[n], msg=n)


def test_residual_generic_received_uploads_the_received_head_plus_residual(tiny_een: EarlyExitNet) -> None:
    """h_i, the teacher head a client uploads, is the personal last head the client trained against."""
    from cafe_ray.algorithms.fedrod import _phead_key
    from cafe_ray.algorithms.heads import final_linear_keys

    alg = cafe(heads="generic_residual", residual_generic="received", lam=1.0)
    data = make_clients(3)
    state = alg.init_server_state(copy.deepcopy(tiny_een))
    payload = alg.server_payloads(state, round_ctx(0, 4, (0, 1, 2)))[0]
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, data[0], client_ctx(0, 0, 4))
    m = tiny_een.num_exits
    wk, bk = final_linear_keys(tiny_een, m - 1)
    torch.testing.assert_close(out.upload.tensors[HEAD_W], payload.tensors[wk] + out.personal[_phead_key(m - 1, "weight")])
    torch.testing.assert_close(out.upload.tensors[HEAD_B], payload.tensors[bk] + out.personal[_phead_key(m - 1, "bias")])
    assert not torch.equal(out.upload.tensors[wk], payload.tensors[wk])  # the generic head itself trained (BSM)


def test_residual_generic_default_legacy_and_bad_value() -> None:
    from cafe_ray.config import LEGACY_VALUES

    assert build_config({"algorithm": {"name": "cafedistill"}}).algorithm.cafedistill.residual_generic == "received_ce"
    assert build_config({"algorithm": {"name": "cafedistill", "cafedistill": {"preset": "spec"}}}
                        ).algorithm.cafedistill.residual_generic == "live"
    assert LEGACY_VALUES["algorithm.cafedistill.residual_generic"] == "live"
    with pytest.raises(ValueError, match="residual_generic"):
        KDOptions(lam=0.0, tau=1.0, residual_generic="global")
