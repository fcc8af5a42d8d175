"""The grouped-kernel cohort (cafe_ray.sim.wide): C clients as one wide network, the same as C models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cafe_ray.algorithms.base import ClientContext, ClientData
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.config import TrainConfig, build_config
from cafe_ray.models.base import EarlyExitNet, LastExitHead
from cafe_ray.models.zoo import cnn_small, conv3, resnet18_ee, transformer4
from cafe_ray.sim import wide as w
from cafe_ray.sim.cohort import AutoVectorize, cohort_sgd, vmap_sgd, wide_sgd


def _clients(model: EarlyExitNet, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n different parameter sets for ``model`` (not the same init: a mixed-up client would show)."""
    g = torch.Generator().manual_seed(seed)
    return [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(n)]


MODELS = {
    "cnn_small": lambda: cnn_small((1, 8, 8), 10, width=4),
    "conv3": lambda: conv3((3, 16, 16), 10, width=4),
    "resnet18_ee": lambda: resnet18_ee((3, 16, 16), 10, width=4),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wide_forward_is_each_clients_forward(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    starts = _clients(model, 3)
    wide, why = w.widen(model, 3)
    assert why is None and wide is not None
    x = torch.randn(5, *{"cnn_small": (1, 8, 8)}.get(name, (3, 16, 16)))
    assert w.check_wide(model, wide, starts, x) is None
    for c in range(3):  # and the parameters come back out unchanged
        back = w.client_params(wide, {k: v.shape for k, v in model.named_parameters()}, c, 3)
        for k, v in back.items():
            assert torch.equal(v, starts[c][k])


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_models_without_a_grouped_form_say_why_and_train_under_vmap():
    torch.manual_seed(0)
    model = transformer4((8,), 4, width=8, vocab_size=50)
    wide, why = w.widen(model, 2)
    assert wide is None and why == "stages.0.0 (_Embed) has no grouped form"
    g = torch.Generator().manual_seed(0)
    datas = [ClientData(x, x[:, 0] % 4, x[:2], x[:2, 0] % 4) for x in
             (torch.randint(1, 50, (n, 8), generator=g) for n in (6, 4))]
    ctxs = [ClientContext(c, 0, 1, 3 + c) for c in range(2)]
    train = TrainConfig(local_epochs=1, batch_size=4, lr=0.1)
    starts = _clients(model, 2)
    cache: dict = {}
    got = cohort_sgd(model, starts, datas, ctxs, train, cache)
    assert cache[2] == (None, why)
    for c in range(2):
        model.load_state_dict(starts[c])
        loss, seen = local_sgd(model, datas[c], ctxs[c], train)
        assert got[c][2] == seen and got[c][1] == pytest.approx(loss, rel=1e-4)


class _MixChannels(nn.Module):
    """Parameter-free but not per channel: swaps the two halves of the channels."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.flip(1)


def test_a_module_that_mixes_channels_is_caught_before_training():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _MixChannels()), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))]
    exits = [nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 3)),
             LastExitHead(nn.Flatten(), 4 * 16, 3)]
    model = EarlyExitNet(stages, exits, 3)
    wide, why = w.widen(model, 2)
    assert why is not None and "_MixChannels" in why  # unknown leaf: refused outright
    # a container whose own forward mixes channels widens, and the forward check catches it
    stages[0] = _FlipBlock()
    model = EarlyExitNet(stages, exits, 3)
    wide, why = w.widen(model, 2)
    assert why is None and wide is not None
    msg = w.check_wide(model, wide, _clients(model, 2), torch.randn(3, 1, 4, 4))
    assert msg is not None and "differs" in msg


class _FlipBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flip(1)


def _data(n: int, shape: tuple[int, ...], seed: int) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ClientData(x, y, x[:2], y[:2])


@pytest.mark.parametrize("name", ["conv3", "resnet18_ee"])
def test_wide_sgd_equals_local_sgd_with_uneven_clients(name):
    """Momentum, weight decay, and clients whose data runs out early (one has none at all)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    train = TrainConfig(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    sizes = [20, 9, 0]
    datas = [_data(n, (3, 16, 16), s) for s, n in enumerate(sizes)]
    ctxs = [ClientContext(c, 0, 1, 100 + c) for c in range(3)]
    starts = _clients(model, 3)
    wide, why = w.widen(model, 3)
    assert wide is not None, why
    got = wide_sgd(model, wide, starts, datas, ctxs, train)
    for c in range(3):
        model.load_state_dict(starts[c])
        loss, seen = local_sgd(model, datas[c], ctxs[c], train)
        params, wloss, wseen, extra = got[c]
        assert extra == {}
        assert wseen == seen == 2 * sizes[c]
        assert wloss == pytest.approx(loss, rel=1e-4, abs=1e-6)
        for k, v in model.named_parameters():
            torch.testing.assert_close(params[k], v.detach(), rtol=1e-4, atol=2e-5)
    for k, v in got[2][0].items():  # no data: untouched
        assert torch.equal(v, starts[2][k])


def test_cohort_sgd_uses_the_wide_network_when_it_exists_and_matches_vmap():
    torch.manual_seed(0)
    model = MODELS["cnn_small"]()
    train = TrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.9)
    datas = [_data(n, (1, 8, 8), s) for s, n in enumerate([16, 12])]
    ctxs = [ClientContext(c, 0, 1, 7 + c) for c in range(2)]
    starts = _clients(model, 2)
    cache: dict = {}
    a = cohort_sgd(model, starts, datas, ctxs, train, cache)
    assert cache[2][0] is not None and cache[2][1] is None  # built once for this size, then reused
    b = vmap_sgd(model, starts, datas, ctxs, train)
    for (pa, la, sa, _), (pb, lb, sb, _) in zip(a, b, strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4)
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)


def test_auto_tries_both_then_keeps_the_faster():
    auto = AutoVectorize()
    order = []
    # warm-ups (not compared): 9 s batched, 8 s per client; then 1.0/1.2 batched vs 2.0/2.5
    for secs in [9.0, 8.0, 1.2, 2.5, 1.0, 2.0] + [50.0] * 3:
        v = auto.next_vectorized()
        order.append(v)
        auto.record(v, secs, 10)
    assert order[:6] == [True, False] * 3
    assert auto.choice is True and order[6:] == [True] * 3  # decided: later timings change nothing
    assert auto.describe() == "auto: on (batched 2.00x the per-client speed)"
    close = AutoVectorize()  # batched 3% faster: within the margin, per-client (the reference) stays
    for secs in (1.0, 5.0, 0.97, 1.0, 0.97, 1.0):
        close.record(close.next_vectorized(), secs, 10)
    assert close.choice is False and not close.next_vectorized() and close.describe().startswith("auto: off")


def test_vectorize_option_takes_auto_and_the_old_booleans():
    assert build_config({"engine": {"vectorize": True}}).engine.vectorize == "on"
    assert build_config({"engine": {"vectorize": False}}).engine.vectorize == "off"
    assert build_config({"engine": {"vectorize": "auto"}}).engine.vectorize == "auto"
    with pytest.raises(Exception, match="vectorize"):
        build_config({"engine": {"vectorize": "sometimes"}})
