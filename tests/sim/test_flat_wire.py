"""Every algorithm gives the same bits whether its messages cross as the Ray executor sends them
(payloads as numpy buffers, uploads as flat buffers summed whole) or as plain tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from cafe_ray.algorithms import available, build_algorithm
from cafe_ray.algorithms.base import ClientResult
from cafe_ray.sim.executor import pack_message, pack_results, unpack_message, unpack_results
from cafe_ray.sim.runner import FitResult
from tests.algorithms.helpers import client_ctx, make_cfg, make_clients, round_ctx
from tests.conftest import make_tiny_een


def _rounds(name: str, wire: bool, rounds: int = 2) -> dict[str, torch.Tensor]:
    alg = build_algorithm(make_cfg(name, train={"max_steps": 2}))
    init = make_tiny_een()
    data = make_clients(num_clients=3, n_train=32, n_test=16)
    state = alg.init_server_state(copy.deepcopy(init))
    personal: dict = {}
    for t in range(rounds):
        parts = tuple(sorted(data))
        rctx = round_ctx(t, rounds, parts)
        payloads = alg.server_payloads(state, rctx)
        fits = []
        for cid in parts:
            payload = unpack_message(pack_message(payloads[cid])) if wire else payloads[cid]
            out = alg.client_update(copy.deepcopy(init), payload, personal.get(cid), data[cid],
                                    client_ctx(cid, t, rounds))
            if out.personal is not None:
                personal[cid] = out.personal
            fits.append(FitResult(cid, t, out))
        if wire:  # two chunks, as two actors would return them
            fits = unpack_results(*pack_results(fits[:2])) + unpack_results(*pack_results(fits[2:]))
        state = alg.aggregate(state, [ClientResult(f.client_id, f.output) for f in fits], rctx)
    return state.tensors


@pytest.mark.parametrize("name", available())
def test_messages_through_flat_buffers_give_the_same_server_state(name: str) -> None:
    plain, wired = _rounds(name, wire=False), _rounds(name, wire=True)
    assert list(plain) == list(wired)
    for k in plain:
        assert plain[k].dtype == wired[k].dtype and torch.equal(plain[k], wired[k]), k
