"""CafeDistill (arXiv:2601.10015) end to end, in-process (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import get_algorithm
from cafe_ray.algorithms.aggregation import flatten
from cafe_ray.algorithms.base import ClientData, ClientResult, Message, ServerState, global_params
from cafe_ray.algorithms.cafedistill import CafeDistill
from cafe_ray.algorithms.cafedistill.algorithm import HEAD_B, HEAD_W, TEACHER_B, TEACHER_W
from cafe_ray.algorithms.fedavg import FedAvgEE
from cafe_ray.models.base import EarlyExitNet
from tests.algorithms.helpers import (
    client_ctx,
    evaluate,
    make_cfg,
    make_clients,
    make_conv_een,
    round_ctx,
    run_rounds,
)
from tests.conftest import make_tiny_een


def cafe(train: dict | None = None, **hp: object) -> CafeDistill:
    """CAFEDistill on the specification's preset (the new options: test_cafedistill_options.py)."""
    return CafeDistill(make_cfg("cafedistill", train=train, cafedistill={"preset": "spec", **hp}))


def one_round(alg: CafeDistill, model: EarlyExitNet, t: int = 0, T: int = 10, clients: int = 3):
    """(state, payloads, results, new state) of one in-process round on tiny data."""
    data = make_clients(clients)
    state = alg.init_server_state(copy.deepcopy(model))
    rctx = round_ctx(t, T, tuple(range(clients)))
    payloads = alg.server_payloads(state, rctx)
    results = [
        ClientResult(c, alg.client_update(copy.deepcopy(model), payloads[c], None, data[c], client_ctx(c, t, T)))
        for c in range(clients)
    ]
    return state, payloads, results, alg.aggregate(state, results, rctx)


def test_registered_as_personalized() -> None:
    assert get_algorithm("cafedistill") is CafeDistill
    assert CafeDistill.personalized


def test_init_state_holds_backbone_and_initial_head(tiny_een: EarlyExitNet) -> None:
    state = cafe().init_server_state(tiny_een)
    assert sorted(global_params(state)) == sorted(tiny_een.backbone_keys())
    torch.testing.assert_close(state.tensors["init_head/weight"], tiny_een.last_head.weight.detach())
    assert state.meta["num_exits"] == 3
    assert state.meta["update_keys"] == [k for k in tiny_een.backbone_keys() if k.startswith(("stages.0.", "stages.1."))]


def test_round_zero_teacher_is_the_initial_head(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    payloads = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 10, (0, 1)))
    for msg in payloads.values():
        torch.testing.assert_close(msg.tensors[TEACHER_W], tiny_een.last_head.weight.detach())
        torch.testing.assert_close(msg.tensors[TEACHER_B], tiny_een.last_head.bias.detach())


def test_payload_is_backbone_plus_one_head(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    msg = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 10, (0,)))[0]
    assert sorted(msg.tensors) == sorted([*tiny_een.backbone_keys(), TEACHER_W, TEACHER_B])


def test_payload_students_follow_the_schedule(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    state = alg.init_server_state(tiny_een)
    # m = 3, T = 4, round 0 -> t = 1: R = 1/2, (m-1)R = 1: d = 1, r = 0
    early = alg.server_payloads(state, round_ctx(0, 4, (0, 1, 2)))
    assert [early[c].meta["students"] for c in range(3)] == [[0], [0], [0]]
    late = alg.server_payloads(state, round_ctx(1, 4, (0, 1, 2)))  # t = 2: R = 1
    assert [late[c].meta["students"] for c in range(3)] == [[0, 1]] * 3


def test_schedule_all_sends_every_student(tiny_een: EarlyExitNet) -> None:
    alg = cafe(selection={"schedule": "all"})
    payloads = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 100, (0, 1)))
    assert [payloads[c].meta["students"] for c in (0, 1)] == [[0, 1], [0, 1]]


def test_unselected_exit_does_not_change_at_all(tiny_een: EarlyExitNet) -> None:
    alg = cafe(train={"weight_decay": 0.1, "momentum": 0.9})
    state = alg.init_server_state(tiny_een)
    payload = alg.server_payloads(state, round_ctx(0, 10, (0,)))[0]
    payload = Message(tensors=payload.tensors, meta={"students": [1]})  # exit 0 left out
    g = torch.Generator().manual_seed(5)
    personal = {k: torch.randn(v.shape, generator=g) for k, v in tiny_een.state_dict().items() if k.startswith("exits.")}
    out = alg.client_update(copy.deepcopy(tiny_een), payload, personal, make_clients(1)[0], client_ctx(0, 0, 10))
    for k in tiny_een.head_keys(0):
        assert torch.equal(out.personal[k], personal[k]), k


def test_selected_and_teacher_heads_change(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    payload = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(0, 10, (0,)))[0]
    payload = Message(tensors=payload.tensors, meta={"students": [1]})
    out = alg.client_update(copy.deepcopy(tiny_een), payload, None, make_clients(1)[0], client_ctx(0, 0, 10))
    sd = tiny_een.state_dict()
    for k in tiny_een.head_keys(1) + tiny_een.head_keys(2):
        assert not torch.equal(out.personal[k], sd[k]), k
    torch.testing.assert_close(out.upload.tensors[HEAD_W], out.personal["exits.2.linear.weight"])


def test_client_output_layout(tiny_een: EarlyExitNet) -> None:
    _, _, results, _ = one_round(cafe(), tiny_een)
    out = results[0].output
    assert sorted(out.upload.tensors) == sorted([*tiny_een.backbone_keys(), HEAD_W, HEAD_B])
    assert sorted(out.personal) == sorted(k for k in tiny_een.state_dict() if k.startswith("exits."))
    assert out.trained_depth == 3
    assert out.num_samples == 48 and out.samples_processed == 48
    assert {"train_loss", "kd_loss", "num_students"} <= set(out.metrics)
    assert out.metrics["kd_loss"] > 0


def test_client_update_requires_students(tiny_een: EarlyExitNet) -> None:
    with pytest.raises(ValueError, match=r"payload.meta\['students'\] is missing"):
        cafe().client_update(copy.deepcopy(tiny_een), Message(), None, make_clients(1)[0], client_ctx(0, 0, 1))


def test_client_update_rejects_the_teacher_as_student(tiny_een: EarlyExitNet) -> None:
    with pytest.raises(ValueError, match=r"student exits must be in \[0, m-2\] = \[0, 1\]"):
        cafe().client_update(
            copy.deepcopy(tiny_een), Message(meta={"students": [2]}), None, make_clients(1)[0], client_ctx(0, 0, 1)
        )


def test_aggregate_averages_backbones_and_stores_heads(tiny_een: EarlyExitNet) -> None:
    state, _, results, new = one_round(cafe(), tiny_een)
    old, glob = global_params(state), global_params(new)
    for k in tiny_een.backbone_keys():
        mean = sum(r.output.upload.tensors[k] for r in results) / len(results)  # equal sample counts
        torch.testing.assert_close(glob[k], mean)
    for r in results:
        assert torch.equal(new.tensors[f"heads/{r.client_id}/weight"], r.output.upload.tensors[HEAD_W])
        k = "stages.0.0.weight"
        torch.testing.assert_close(new.tensors[f"upd/{r.client_id}/{k}"], r.output.upload.tensors[k] - old[k])
    torch.testing.assert_close(new.tensors["aggupd/stages.0.0.weight"], glob["stages.0.0.weight"] - old["stages.0.0.weight"])
    assert not any(k.startswith("aggupd/stages.2.") for k in new.tensors)  # never compared


def test_aggregate_without_results_keeps_state(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    state = alg.init_server_state(tiny_een)
    assert alg.aggregate(state, [], round_ctx(0, 10, ())) is state


def _inject_heads(state: ServerState, heads: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> ServerState:
    tensors = dict(state.tensors)
    for cid, (w, b) in heads.items():
        tensors[f"heads/{cid}/weight"], tensors[f"heads/{cid}/bias"] = w, b
    return ServerState(tensors=tensors, meta=dict(state.meta))


def _random_heads(ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return {c: (torch.randn(4, 16, generator=g), torch.randn(4, generator=g)) for c in ids}


def test_tiny_mu_teacher_is_the_own_head(tiny_een: EarlyExitNet) -> None:
    alg = cafe(mu=1e-6)
    heads = _random_heads([0, 1, 2])
    teachers = alg.teacher_heads(_inject_heads(alg.init_server_state(tiny_een), heads), [0, 2])
    for c in (0, 2):
        torch.testing.assert_close(teachers[c][0], heads[c][0])
        torch.testing.assert_close(teachers[c][1], heads[c][1])


def test_all_seen_pool_includes_absent_clients(tiny_een: EarlyExitNet) -> None:
    heads = _random_heads([0, 1, 2])
    state = _inject_heads(cafe().init_server_state(tiny_een), heads)
    mean_all = sum(h[0] for h in heads.values()) / 3
    mean_part = (heads[0][0] + heads[1][0]) / 2
    torch.testing.assert_close(cafe(mu=1e6).teacher_heads(state, [0, 1])[0][0], mean_all, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        cafe(mu=1e6, teachers="participants").teacher_heads(state, [0, 1])[0][0], mean_part, atol=1e-5, rtol=0
    )


def test_newcomer_gets_the_uniform_mix(tiny_een: EarlyExitNet) -> None:
    alg = cafe(mu=1e-6)  # would be the own head if it had one
    heads = _random_heads([0, 1])
    teachers = alg.teacher_heads(_inject_heads(alg.init_server_state(tiny_een), heads), [0, 5])
    torch.testing.assert_close(teachers[5][0], (heads[0][0] + heads[1][0]) / 2)


def test_least_conflict_clients_win_tier_two_from_server_state(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    state = alg.init_server_state(tiny_een)
    keys = state.meta["update_keys"]
    tensors = dict(state.tensors)
    ref = {k: torch.ones_like(state.tensors["global/" + k]) for k in keys}
    tensors.update({"aggupd/" + k: v for k, v in ref.items()})
    for cid, sign in {0: -1.0, 1: 1.0, 2: -0.5, 3: 0.5}.items():
        tensors.update({f"upd/{cid}/{k}": sign * v for k, v in ref.items()})
    state = ServerState(tensors=tensors, meta=state.meta)
    # m = 3, T = 8, round 0 -> t = 1: R = 1/4, (m-1)R = 1/2: d = 0, B = round(2.5) = 3 slots of exit 0
    students = alg.students(state, round_ctx(0, 8, (0, 1, 2, 3, 4)))
    # 1 and 3 agree with the aggregate (cosine 1); 4 has no history (0); 0 and 2 conflict (-1)
    assert students == {0: (), 1: (0,), 2: (), 3: (0,), 4: (0,)}


def test_head_cosine_clients_closest_to_the_mean_head_win(tiny_een: EarlyExitNet) -> None:
    alg = cafe(selection={"similarity": "head_cosine"})
    state = alg.init_server_state(tiny_een)
    vecs = {0: [1.0, 0.0, 0.0], 1: [1.0, 0.2, 0.0], 2: [0.0, 0.0, 1.0], 3: [1.0, -0.2, 0.0]}
    tensors = dict(state.tensors)
    tensors.update({f"selhead/{c}/0": torch.tensor(v) for c, v in vecs.items()})
    state = ServerState(tensors=tensors, meta=state.meta)
    # m = 3, T = 16, round 1 -> t = 2: (m-1)R = 1/2: d = 0, B = round(2) = 2 slots of exit 0
    students = alg.students(state, round_ctx(1, 16, (0, 1, 2, 3)))
    assert students == {0: (0,), 1: (0,), 2: (), 3: ()} or students == {0: (0,), 1: (), 2: (), 3: (0,)}
    assert students[0] == (0,)  # the head nearest the mean wins outright


def test_head_cosine_uploads_and_stores_the_next_tier_two_head(tiny_een: EarlyExitNet) -> None:
    alg = cafe(selection={"similarity": "head_cosine"})
    _, payloads, results, new = one_round(alg, tiny_een, t=0, T=16)
    assert payloads[0].meta["select_exit"] == 0  # round 1 (t = 2): (m-1)R = 1/2, d = 0: tier 2 = exit 0
    assert results[0].output.upload.meta == {"select_exit": 0}
    head0 = {k: v for k, v in results[0].output.personal.items() if k.startswith("exits.0.")}
    torch.testing.assert_close(new.tensors["selhead/0/0"], flatten(head0).float())


def test_head_cosine_last_round_uploads_no_extra_head(tiny_een: EarlyExitNet) -> None:
    alg = cafe(selection={"similarity": "head_cosine"})
    payloads = alg.server_payloads(alg.init_server_state(tiny_een), round_ctx(3, 4, (0,)))
    assert "select_exit" not in payloads[0].meta


@pytest.mark.parametrize("model_fn,shape", [(make_tiny_een, (8,)), (make_conv_een, (1, 4, 4))], ids=["mlp", "cnn"])
@pytest.mark.parametrize("similarity", ["update_cosine", "head_cosine"])
def test_bytes_do_not_exceed_fedavg(model_fn, shape: tuple[int, ...], similarity: str) -> None:
    model = model_fn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *shape, generator=g), torch.randint(0, model.num_classes, (8,), generator=g)
    data = ClientData(x, y, x, y)
    rctx, cctx = round_ctx(0, 16, (0,)), client_ctx(0, 0, 16)
    ours = cafe(selection={"similarity": similarity})
    fedavg = FedAvgEE(make_cfg("fedavg_ee"))
    down = ours.server_payloads(ours.init_server_state(model), rctx)[0]
    fa_down = fedavg.server_payloads(fedavg.init_server_state(model), rctx)[0]
    up = ours.client_update(copy.deepcopy(model), down, None, data, cctx).upload
    fa_up = fedavg.client_update(copy.deepcopy(model), fa_down, None, data, cctx).upload
    assert down.nbytes < fa_down.nbytes
    assert up.nbytes < fa_up.nbytes


def test_eval_payload_is_the_backbone(tiny_een: EarlyExitNet) -> None:
    alg = cafe()
    assert sorted(alg.eval_payload(alg.init_server_state(tiny_een)).tensors) == sorted(tiny_een.backbone_keys())


def test_rounds_are_deterministic(tiny_een: EarlyExitNet) -> None:
    data = make_clients(3, n_train=16, n_test=8)
    s1, p1 = run_rounds(cafe(), tiny_een, data, 2)
    s2, p2 = run_rounds(cafe(), tiny_een, data, 2)
    assert s1.tensors.keys() == s2.tensors.keys()
    assert all(torch.equal(s1.tensors[k], s2.tensors[k]) for k in s1.tensors)
    assert all(torch.equal(p1[c][k], p2[c][k]) for c in p1 for k in p1[c])


def test_simulation_beats_chance(tiny_een: EarlyExitNet) -> None:
    data = make_clients(4)
    alg = cafe()
    before = evaluate(alg, tiny_een, alg.init_server_state(tiny_een), {}, data)
    state, personal = run_rounds(alg, tiny_een, data, 6, participants=[(0, 1, 2), (1, 2, 3)] * 3)
    after = evaluate(alg, tiny_een, state, personal, data)
    assert min(after) > 0.6  # chance is 1/4
    assert sum(after) / len(after) > sum(before) / len(before) + 0.3


def test_package_never_imports_ray() -> None:
    import ast
    from pathlib import Path

    import cafe_ray.algorithms.cafedistill as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path.name


@pytest.mark.parametrize(
    "name,dataset,shape",
    [("cnn_small", "digits", (1, 8, 8)), ("conv3", "cifar10", (3, 32, 32)),
     ("resnet18_ee", "cifar100", (3, 32, 32)), ("transformer4", "agnews", (16,))],
)
def test_zoo_bytes_do_not_exceed_fedavg(name: str, dataset: str, shape: tuple[int, ...]) -> None:
    from cafe_ray.config import ModelConfig
    from cafe_ray.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), dataset, shape, num_classes=10, vocab_size=50)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 50, (4, *shape), generator=g) if len(shape) == 1 else torch.randn(4, *shape, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    data = ClientData(x, y, x, y)
    rctx, cctx = round_ctx(0, 16, (0,)), client_ctx(0, 0, 16)
    ours = cafe(train={"max_steps": 1}, selection={"similarity": "head_cosine"})
    fedavg = FedAvgEE(make_cfg("fedavg_ee", train={"max_steps": 1}))
    down = ours.server_payloads(ours.init_server_state(model), rctx)[0]
    fa_down = fedavg.server_payloads(fedavg.init_server_state(model), rctx)[0]
    up = ours.client_update(copy.deepcopy(model), down, None, data, cctx).upload
    assert down.nbytes < fa_down.nbytes
    assert up.nbytes < fa_down.nbytes  # FedAvg-EE uploads what it downloads: the whole model
