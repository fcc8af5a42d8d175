"""Local compute per client-round: every algorithm reports its sample passes, and train.max_steps
caps every pass of every algorithm (two-pass methods report both passes)."""

from __future__ import annotations

import copy

import pytest

from cafe_ray.algorithms import available, get_algorithm
from cafe_ray.algorithms.base import ClientResult
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.conftest import make_tiny_een

# Local training passes over the data per round (FedPAC adds forward-only feature statistics).
TWO_PASS = {"ditto_ee", "fedrep_ee", "fedpac_ee"}
BATCH = 8


def one_round_outputs(name: str, max_steps: int | None) -> list[ClientResult]:
    alg = get_algorithm(name)(make_cfg(name, train={"batch_size": BATCH, "max_steps": max_steps}))
    model = make_tiny_een()
    data = make_clients(2, n_train=48)
    state = alg.init_server_state(copy.deepcopy(model))
    rctx = round_ctx(0, 2, (0, 1))
    payloads = alg.server_payloads(state, rctx)
    return [ClientResult(c, alg.client_update(copy.deepcopy(model), payloads[c], None, data[c], client_ctx(c, 0, 2)))
            for c in (0, 1)]


@pytest.mark.parametrize("name", [a for a in available() if a not in ("scalefl", "depthfl")])
def test_samples_processed_counts_every_pass_and_max_steps_caps_each(name: str) -> None:
    passes = 2 if name in TWO_PASS else 1
    extra = (2 * 48) // 3 if name == "fedpac_ee" else 0  # FedPAC's feature statistics (forward only)
    full = one_round_outputs(name, None)
    capped = one_round_outputs(name, 2)
    for r in full:
        assert r.output.samples_processed == passes * 48 + extra, name
    for r in capped:
        assert r.output.samples_processed == passes * 2 * BATCH + extra, name


def test_engine_sums_samples_processed_per_round(tmp_path) -> None:
    """metrics.jsonl carries each round's sample passes: FedRep-EE's two passes show as twice FedPer-EE's."""
    import json

    from cafe_ray.sim.engine import run_simulation
    from tests.sim.conftest import tiny_cfg

    per_round = {}
    for name in ("fedper_ee", "fedrep_ee"):
        cfg = tiny_cfg(tmp_path / name, f"algorithm.name={name}", "round.num_rounds=2", "round.fraction=1.0",
                       executor="sequential")
        run_dir, _ = run_simulation(cfg, show_progress=False)
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
        for rec in rounds:
            assert rec["samples_processed"] == sum(c["samples"] for c in clients if c["round"] == rec["round"])
        per_round[name] = rounds[0]["samples_processed"]
    assert per_round["fedper_ee"] > 0 and per_round["fedrep_ee"] == 2 * per_round["fedper_ee"]
