"""Measured MACs per exit, and the MACs cache (memory + disk, corruption-tolerant)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cafe_ray.config import ModelConfig
from cafe_ray.models import ExitCost, build_model, exit_macs, models_table
from cafe_ray.models import macs as macs_mod
from cafe_ray.models.macs import architecture_key

from .specs import IDS, SPECS, Spec


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_macs_positive_and_increasing(spec: Spec):
    cost = exit_macs(spec.build(), spec.shape, spec.dtype)
    assert isinstance(cost, ExitCost)
    assert len(cost.cumulative) == len(cost.stage_macs) == len(cost.head_macs) == spec.exits
    assert all(m > 0 for m in cost.stage_macs + cost.head_macs)
    assert all(a < b for a, b in zip(cost.cumulative, cost.cumulative[1:], strict=False))
    for k in range(spec.exits):
        assert cost.cumulative[k] == sum(cost.stage_macs[: k + 1]) + cost.head_macs[k]
        assert cost.cascade[k] == cost.train_macs(k + 1)
    assert list(cost) == cost.cumulative and cost[-1] == cost.cumulative[-1]


def test_conv_macs_match_the_layer_arithmetic():
    """Sanity of the counter itself: conv3 stage 1 is one 3x3 conv 3->8 on 32x32."""
    cost = exit_macs(Spec("conv3", "cifar10", (3, 32, 32), 10, 8).build(), (3, 32, 32))
    assert cost.stage_macs[0] == 32 * 32 * 3 * 8 * 9
    assert cost.head_macs[0] == 8 * 4 * 10  # pool to 2x2, linear (bias not counted)


def test_transformer_attention_is_counted():
    """A block is 12*L*d^2 MACs of linears plus 2*L^2*d of attention (QK^T and AV)."""
    spec = next(s for s in SPECS if s.vocab)
    cost = exit_macs(spec.build(), spec.shape, torch.int64)
    seq, d = spec.shape[0], spec.width
    assert cost.stage_macs[1] == 12 * seq * d * d + 2 * seq * seq * d
    assert cost.stage_macs[1] == cost.stage_macs[2]


def test_resnet18_full_width_macs():
    """width=64 is the real CIFAR ResNet-18 (~0.56 GMACs incl. exits)."""
    net = build_model(ModelConfig(name="resnet18_ee", width=64), "cifar100", (3, 32, 32), 100)
    cost = exit_macs(net, (3, 32, 32))
    backbone = sum(cost.stage_macs)
    assert 550e6 < backbone < 560e6  # torchvision-style ResNet-18 on 32x32 is ~555.4M
    assert cost.cumulative[-1] == backbone + 512 * 100
    assert all(a < b for a, b in zip(cost.cumulative, cost.cumulative[1:], strict=False))


def test_measuring_leaves_mode_and_rng_alone():
    net = SPECS[0].build().train()
    net.exits[0].eval()
    state = torch.random.get_rng_state()
    exit_macs(net, SPECS[0].shape)
    assert torch.equal(state, torch.random.get_rng_state())
    assert net.training and net.stages[0].training and not net.exits[0].training


# ------------------------------------------------------------------------- cache
@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = macs_mod.measure_exit_cost

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(macs_mod, "measure_exit_cost", wrapped)
    return calls


def test_second_call_is_cached_in_memory_and_on_disk(counted, isolated_macs_cache):
    spec = SPECS[0]
    first = exit_macs(spec.build(), spec.shape)
    again = exit_macs(spec.build(seed=5), spec.shape)  # other weights, same architecture
    assert len(counted) == 1 and again == first
    assert isolated_macs_cache.exists()
    macs_mod.clear_memory_cache()
    assert exit_macs(spec.build(), spec.shape) == first  # from disk
    assert len(counted) == 1


def test_corrupt_cache_file_is_rewritten(counted, isolated_macs_cache):
    spec = SPECS[0]
    isolated_macs_cache.parent.mkdir(parents=True)
    isolated_macs_cache.write_text("{not json")
    cost = exit_macs(spec.build(), spec.shape)
    assert len(counted) == 1 and all(m > 0 for m in cost)
    data = json.loads(isolated_macs_cache.read_text())
    assert data[architecture_key(spec.build(), spec.shape, torch.float32)]["stage_macs"] == cost.stage_macs
    # a valid file with a malformed entry is also measured again
    key = next(iter(data))
    isolated_macs_cache.write_text(json.dumps({key: {"stage_macs": "x"}}))
    macs_mod.clear_memory_cache()
    assert exit_macs(spec.build(), spec.shape) == cost
    assert len(counted) == 2


def test_key_changes_with_architecture():
    spec = SPECS[2]  # conv3
    net = spec.build()
    key = architecture_key(net, spec.shape, torch.float32)
    assert key == architecture_key(spec.build(seed=9), spec.shape, torch.float32)
    assert key != architecture_key(net, (3, 64, 64), torch.float32)
    wider = build_model(ModelConfig(name="conv3", width=16), "cifar10", spec.shape, 10)
    assert key != architecture_key(wider, spec.shape, torch.float32)
    strided = copy.deepcopy(net)
    strided.stages[0][0].stride = (2, 2)  # same parameter shapes, different compute
    assert key != architecture_key(strided, spec.shape, torch.float32)
    assert exit_macs(strided, spec.shape).stage_macs[0] < exit_macs(net, spec.shape).stage_macs[0]


def test_models_table_rows():
    rows = models_table(width=8)
    assert [r["name"] for r in rows] == ["cnn_small", "conv3", "resnet18_ee", "transformer4"]
    for r in rows:
        assert r["params"] == r["backbone_params"] + r["head_params"] > 0
        assert len(r["exit_macs"]) == r["num_exits"]
        assert all(a < b for a, b in zip(r["exit_macs"], r["exit_macs"][1:], strict=False))
    assert rows[2]["input_shape"] == [3, 32, 32] and rows[3]["input_shape"] == [64]
