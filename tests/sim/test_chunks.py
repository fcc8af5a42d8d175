"""Fewer, fatter Ray tasks: any chunking and any number of actors give the sequential metrics."""

import numpy as np
import pytest
import torch

from cafe_ray.algorithms import ClientOutput, Message
from cafe_ray.runs import rundir
from cafe_ray.sim.engine import run_simulation
from cafe_ray.sim.executor import pack_result, unpack_result
from cafe_ray.sim.runner import FitResult
from tests.sim.conftest import comparable, tiny_cfg


@pytest.mark.usefixtures("ray_session")
def test_chunked_equals_sequential_for_one_and_two_actors(tmp_path):
    sets = ("round.num_rounds=3", "algorithm.name=fedper_ee", "round.fraction=1.0", "data.num_clients=7")
    runs = {
        "sequential": tiny_cfg(tmp_path / "s", *sets, executor="sequential"),
        "1 actor, adaptive": tiny_cfg(tmp_path / "a", *sets, "profiles.actors_per_class=1"),
        "2 actors, 1 per task": tiny_cfg(tmp_path / "b", *sets, "engine.chunk_clients=1"),
        "2 actors, 3 per task": tiny_cfg(tmp_path / "c", *sets, "engine.chunk_clients=3"),
        "1 actor, all in one task": tiny_cfg(tmp_path / "d", *sets, "engine.chunk_clients=64",
                                             "profiles.actors_per_class=1"),
    }
    dirs = {k: run_simulation(c, show_progress=False)[0] for k, c in runs.items()}
    metrics = {k: comparable(rundir.read_jsonl(d / "metrics.jsonl")) for k, d in dirs.items()}
    for k, m in metrics.items():
        assert m == metrics["sequential"], k
    assert len({r["pid"] for r in rundir.read_jsonl(dirs["2 actors, 3 per task"] / "clients.jsonl")}) == 2


def test_pack_unpack_round_trip_keeps_values_and_dtypes():
    up = {"w": torch.randn(3, 4), "n": torch.tensor([5], dtype=torch.int64)}
    out = ClientOutput(Message(tensors=up), None, 10, 10, 2, {"train_loss": 0.5})
    packed = pack_result(FitResult(1, 0, out))
    assert all(isinstance(v, np.ndarray) for v in packed.output.upload.tensors.values())
    back = unpack_result(packed).output.upload.tensors
    assert back.keys() == up.keys() and all(torch.equal(back[k], up[k]) for k in up)
    assert back["n"].dtype == torch.int64
    failed = FitResult(2, 0, None, error="worker died")
    assert unpack_result(pack_result(failed)) == failed


@pytest.mark.usefixtures("ray_session")
def test_coordinator_keeps_the_object_store_copy_of_the_data_only(tmp_path):
    from cafe_ray.sim.engine import _ray_factory
    from cafe_ray.sim.simulation import Simulation

    cfg = tiny_cfg(tmp_path, "round.num_rounds=1", "round.fraction=1.0")
    sim = Simulation(cfg, tmp_path / "run", _ray_factory)
    try:
        # zero-copy views of the object store's buffers (read-only), not a private copy
        for a in (sim.dataset.x_train, sim.dataset.x_test):
            assert not a.flags.writeable and not a.flags.owndata
        assert sim.run()["rounds"] == 1
    finally:
        sim.executor.shutdown()
