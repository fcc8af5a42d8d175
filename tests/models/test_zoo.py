"""Zoo contract: exits, forward_until, phi/teacher head, parameter split, build_model."""

from __future__ import annotations

import pytest
import torch

from cafe_ray.config import ModelConfig
from cafe_ray.models import MODEL_NAMES, LastExitHead, build_model
from cafe_ray.models.inputs import AUTO_MODEL, resolve_model_name

from .specs import IDS, SPECS, Spec


@pytest.fixture(params=SPECS, ids=IDS)
def spec(request) -> Spec:
    return request.param


def test_forward_returns_one_logit_per_exit(spec: Spec):
    net = spec.build()
    logits = net(spec.batch())
    assert net.num_exits == spec.exits == len(logits)
    for z in logits:
        assert z.shape == (2, spec.classes)
        assert torch.isfinite(z).all()


def test_forward_until_matches_forward(spec: Spec):
    net = spec.build().eval()
    x = spec.batch()
    with torch.no_grad():
        full = net(x)
        for k in range(net.num_exits):
            part = net.forward_until(x, k)
            assert len(part) == k + 1
            for a, b in zip(part, full[: k + 1], strict=True):
                torch.testing.assert_close(a, b)


def test_phi_times_last_head_is_last_logits(spec: Spec):
    net = spec.build().eval()
    with torch.no_grad():
        logits, feat = net.forward_with_features(spec.batch())
        w, b = net.last_head.weight, net.last_head.bias  # (K, D), (K,)
        assert feat.shape == (2, w.shape[1])
        torch.testing.assert_close(feat @ w.T + b, logits[-1])
        torch.testing.assert_close(logits[-1], net(spec.batch())[-1])


def test_last_exit_is_parameter_free_feature_plus_linear(spec: Spec):
    net = spec.build()
    last = net.exits[-1]
    assert isinstance(last, LastExitHead)
    assert not list(last.feature.parameters())
    assert sorted(n for n, _ in last.named_parameters()) == ["linear.bias", "linear.weight"]


def test_state_dict_splits_into_backbone_and_heads(spec: Spec):
    net = spec.build()
    keys = list(net.state_dict())
    backbone = net.backbone_keys()
    heads = [k for i in range(net.num_exits) for k in net.head_keys(i)]
    stages = [k for i in range(net.num_exits) for k in net.stage_keys(i)]
    assert set(backbone).isdisjoint(heads)
    assert sorted(backbone + heads) == sorted(keys)  # complete, no duplicates
    assert sorted(stages) == sorted(backbone)
    assert all(net.head_keys(i) for i in range(net.num_exits))  # every head has weights
    assert all(net.stage_keys(i) for i in range(net.num_exits))
    assert not any("running_mean" in k for k in keys)  # GroupNorm, no BN statistics


def test_every_parameter_gets_a_gradient(spec: Spec):
    net = spec.build().train()
    loss = sum(z.square().mean() for z in net(spec.batch()))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_build_is_deterministic_under_seed(spec: Spec):
    a, b = spec.build(seed=3).state_dict(), spec.build(seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- transformer
TEXT = next(s for s in SPECS if s.vocab)


def test_transformer_ignores_padding():
    """Trailing padding changes nothing: masked in attention and in every pooling head."""
    net = TEXT.build().eval()
    x = TEXT.batch()[:1]  # (1, 16)
    x[0, 8:] = 0
    with torch.no_grad():
        padded = net(x)
        short = net(x[:, :8])  # same tokens, no padding
    for a, b in zip(padded, short, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_transformer_all_padding_row_is_finite():
    net = TEXT.build().eval()
    x = torch.zeros((2, *TEXT.shape), dtype=torch.int64)  # (2, L) all padding
    with torch.no_grad():
        assert all(torch.isfinite(z).all() for z in net(x))


# ------------------------------------------------------------------- build_model
@pytest.mark.parametrize("dataset,expected", sorted(AUTO_MODEL.items()))
def test_auto_resolves_per_dataset(dataset: str, expected: str):
    assert resolve_model_name("auto", dataset) == expected


def test_auto_builds_the_right_architecture():
    cfg = ModelConfig(name="auto", width=8)
    assert build_model(cfg, "digits", (1, 8, 8), 10).num_exits == 3
    assert build_model(cfg, "cifar100", (3, 32, 32), 100).num_exits == 4
    assert build_model(cfg, "agnews", (16,), 4, vocab_size=50).num_exits == 4
    assert build_model(ModelConfig(width=32), "agnews", (16,), 4, vocab_size=50).num_exits == 4


def test_model_names():
    assert set(MODEL_NAMES) == {"cnn_small", "conv3", "resnet18_ee", "transformer4"}
    assert set(AUTO_MODEL.values()) <= set(MODEL_NAMES)


def test_transformer_on_images_is_rejected():
    with pytest.raises(ValueError, match=r"model\.name='transformer4'.*cifar10.*allowed for images: auto, cnn_small"):
        build_model(ModelConfig(name="transformer4", width=8), "cifar10", (3, 32, 32), 10)


def test_cnn_on_text_is_rejected():
    with pytest.raises(ValueError, match=r"model\.name='conv3'.*agnews.*allowed for text: auto, transformer4"):
        build_model(ModelConfig(name="conv3", width=8), "agnews", (16,), 4, vocab_size=50)


def test_transformer_needs_vocab_size():
    with pytest.raises(ValueError, match=r"model\.name='transformer4'.*vocab_size"):
        build_model(ModelConfig(name="transformer4", width=8), "agnews", (16,), 4)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match=r"model\.name='auto' has no default for dataset 'mnist'.*cnn_small"):
        resolve_model_name("auto", "mnist")
    with pytest.raises(ValueError, match=r"model\.name='vgg'.*allowed: auto, cnn_small, conv3"):
        build_model(ModelConfig.model_construct(name="vgg", width=8), "cifar10", (3, 32, 32), 10)


def test_too_small_images_are_rejected():
    with pytest.raises(ValueError, match=r"model\.name='conv3' needs H, W >= 8"):
        build_model(ModelConfig(name="conv3", width=8), "digits", (1, 4, 4), 10)
