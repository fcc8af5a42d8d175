"""Flat parameter buffers: what the Ray executor hands to aggregation, and what it puts as a payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cafe_ray.algorithms.aggregation import StreamingMean
from cafe_ray.algorithms.base import Message, params_nbytes
from cafe_ray.algorithms.flat import FlatParams, from_buffers, pack_many, to_buffers
from cafe_ray.sim.executor import pack_message, unpack_message


def _updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"conv.weight": torch.randn(4, 2, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
             "head.weight": torch.randn(3, 4, generator=g)} for _ in range(n)]


def _flat(updates: list[dict[str, torch.Tensor]]) -> list[FlatParams]:
    wires, buffers = pack_many(updates)
    return [from_buffers(w, buffers) for w in wires]


def test_views_equal_the_tensors_keep_order_and_are_made_only_when_read() -> None:
    ups = _updates(3)
    flats = _flat(ups)
    f = flats[1]
    assert f._views is None and list(f) == list(ups[1]) and len(f) == 3 and "conv.bias" in f
    assert params_nbytes(f) == params_nbytes(ups[1]) and f._views is None  # counted from the buffer
    assert all(torch.equal(f[k], ups[1][k]) for k in ups[1]) and f["conv.weight"].shape == (4, 2, 3, 3)
    assert flats[0].layout == flats[2].layout  # one structure: the same layout (summed as wholes)


@pytest.mark.parametrize("order", ["flat", "plain", "flat then plain", "plain then flat"])
def test_streaming_mean_over_flat_buffers_gives_the_same_bits(order: str) -> None:
    ups = _updates(5, seed=1)
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    flats = _flat(ups)
    ref = StreamingMean()
    for u, w in zip(ups, weights, strict=True):
        ref.add(u, w)
    mean = StreamingMean()
    for i, w in enumerate(weights):
        pick_flat = {"flat": True, "plain": False, "flat then plain": i < 2, "plain then flat": i >= 2}[order]
        mean.add(flats[i] if pick_flat else ups[i], w)
    like = {k: v.to(torch.float32) for k, v in ups[0].items()}
    got, want = mean.result(like), ref.result(like)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), k


def test_streaming_mean_over_flat_buffers_rejects_other_keys() -> None:
    flats = _flat(_updates(1))
    mean = StreamingMean()
    mean.add(flats[0], 1.0)
    with pytest.raises(KeyError, match="update keys differ"):
        mean.add({"other": torch.zeros(1)}, 1.0)


def test_a_payload_crosses_as_numpy_buffers_and_arrives_writable() -> None:
    msg = Message(tensors={"w": torch.randn(2, 3), "steps": torch.tensor([4], dtype=torch.int64)}, meta={"k": 1})
    light, wire, buffers = pack_message(msg)
    assert light.tensors == {} and light.meta == {"k": 1}
    assert all(isinstance(b, np.ndarray) for b in buffers.values())
    for b in buffers.values():
        b.setflags(write=False)  # as the object store hands it over
    got = unpack_message((light, wire, buffers))
    assert got.meta == {"k": 1} and torch.equal(got.tensors["w"], msg.tensors["w"])
    got.tensors["w"].add_(1.0)  # the client's own copy
    assert torch.equal(torch.from_numpy(buffers["torch.float32"][:6].copy()).view(2, 3), msg.tensors["w"])


def test_a_payload_numpy_cannot_hold_travels_as_it_is() -> None:
    msg = Message(tensors={"w": torch.ones(2, dtype=torch.bfloat16)})
    assert pack_message(msg) is msg and unpack_message(msg) is msg


def test_an_empty_message_round_trips() -> None:
    wire, buffers = to_buffers({})
    assert buffers == {} and dict(from_buffers(wire, buffers)) == {}
