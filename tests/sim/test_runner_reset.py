"""ClientRunner._reset: every client starts from the initial weights, however the previous one left
the model (trained weights, frozen parameters, a replaced module)."""

from __future__ import annotations

import torch

from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.sim.runner import ClientRunner
from tests.sim.conftest import tiny_cfg


def _runner(tmp_path) -> ClientRunner:
    cfg = tiny_cfg(tmp_path, executor="sequential")
    ds = load_dataset(cfg.data, seed=cfg.seed)
    return ClientRunner(cfg, ds, partition_clients(ds, cfg.data, seed=cfg.seed), tmp_path / "store")


def _same_as_init(r: ClientRunner) -> bool:
    return all(torch.equal(v, r.init_state[k]) for k, v in r.model.state_dict().items())


def test_reset_restores_weights_and_gradients_flags(tmp_path):
    r = _runner(tmp_path)
    r._reset()
    with torch.no_grad():
        for p in r.model.parameters():
            p.add_(1.0)
            p.requires_grad_(False)
    assert not _same_as_init(r)
    r._reset()
    assert _same_as_init(r) and all(p.requires_grad for p in r.model.parameters())


def test_reset_follows_a_replaced_parameter(tmp_path):
    r = _runner(tmp_path)
    r._reset()  # caches views of the current tensors
    name, old = next(iter(r.model.named_parameters()))
    module = r.model.get_submodule(name.rsplit(".", 1)[0])
    setattr(module, name.rsplit(".", 1)[1], torch.nn.Parameter(old.detach() + 5.0))
    r._reset()
    assert _same_as_init(r)  # the new parameter object was reset too, not the stale view
