"""Fewer, fatter Ray tasks: any chunking and any number of actors give the sequential metrics."""

import numpy as np
import pytest
import torch

from cafe_ray.algorithms import ClientOutput, Message
from cafe_ray.runs import rundir
from cafe_ray.sim.engine import run_simulation
from cafe_ray.sim.executor import balanced_chunks, pack_results, unpack_results
from cafe_ray.sim.runner import FitResult
from tests.sim.conftest import comparable, tiny_cfg


@pytest.mark.slow  # five runs, one per chunking, on real actors
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


def test_pack_unpack_round_trip_keeps_values_dtypes_and_failures():
    ups = [{"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([5], dtype=torch.int64)},
           {"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([7], dtype=torch.int64)}]
    res = [FitResult(1, 0, ClientOutput(Message(tensors=ups[0]), None, 10, 10, 2, {"train_loss": 0.5})),
           FitResult(2, 0, None, error="worker died"),
           FitResult(3, 0, ClientOutput(Message(tensors=ups[1]), None, 4, 4, 2, {}))]
    packed, buffers = pack_results(res)
    # one flat buffer per dtype, however many clients and tensors
    assert sorted(buffers) == ["torch.float32", "torch.int64"]
    assert buffers["torch.float32"].size == 2 * (12 + 4) and isinstance(buffers["torch.float32"], np.ndarray)
    back = unpack_results(packed, buffers)
    assert back[1] == res[1]
    for r, up in ((back[0], ups[0]), (back[2], ups[1])):
        t = r.output.upload.tensors
        assert t.keys() == up.keys() and all(torch.equal(t[k], up[k]) for k in up)
        assert t["n"].dtype == torch.int64 and t["w"].shape == (3, 4)
    assert back[0].output.num_samples == 10 and back[0].output.metrics == {"train_loss": 0.5}
    assert pack_results([]) == ([], {})


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


def test_balanced_chunks_give_each_actor_one_call_of_about_equal_work():
    # equal work: one chunk per actor, jobs kept in order inside each
    assert balanced_chunks(list(range(10)), [1.0] * 10, 2) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    # unequal work: the heavy job alone, the light ones together (10 vs 10, not 12 vs 8)
    assert balanced_chunks([7, 8, 9, 10, 11, 12], [10, 1, 1, 1, 1, 6], 2) == [[7], [8, 9, 10, 11, 12]]
    # fewer jobs than actors: one job per call, no empty calls
    assert balanced_chunks([3, 5], [1.0, 1.0], 4) == [[3], [5]]
    assert balanced_chunks([], [], 2) == []
    # more than max_chunk per actor: more calls, none over max_chunk, every job exactly once
    chunks = balanced_chunks(list(range(300)), [float(i % 7) for i in range(300)], 2, max_chunk=64)
    assert len(chunks) % 2 == 0 and all(len(c) <= 64 for c in chunks)
    assert sorted(i for c in chunks for i in c) == list(range(300))
    work = [sum(i % 7 for i in c) for c in chunks]
    assert max(work) - min(work) <= 6  # greedy longest-first: within one job's work


def test_balanced_chunks_split_finer_when_asked_and_stay_balanced():
    costs = [5.0, 1.0, 1.0, 3.0, 2.0, 2.0, 4.0, 1.0]
    chunks = balanced_chunks(list(range(8)), costs, 2, min_chunks=4)
    assert len(chunks) == 4 and sorted(i for c in chunks for i in c) == list(range(8))
    work = sorted(sum(costs[i] for i in c) for c in chunks)
    assert work == [4.0, 5.0, 5.0, 5.0]
    assert balanced_chunks([1, 2], [1.0, 1.0], 2, min_chunks=10) == [[1], [2]]  # never more chunks than jobs


def test_executor_splits_long_rounds_into_calls_of_about_the_target_length():
    """After a round, the pool's seconds per sample decide the next round's chunks: a tiny
    workload stays one call per actor, one whose clients take long is fed client by client."""
    from cafe_ray.config import build_config
    from cafe_ray.data.base import ClientSplits
    from cafe_ray.sim.executor import TARGET_CHUNK_S, RayExecutor
    from cafe_ray.sim.runner import FitJob

    ex = RayExecutor.__new__(RayExecutor)  # no Ray: only the chunking logic
    ex.vectorize, ex.chunk_clients, ex._rate = False, None, {}
    ex._train = build_config({"train": {"local_epochs": 1, "batch_size": 32}}).train
    n = 20
    sizes = np.full(n, 100, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    ex._splits = ClientSplits(ptr, np.arange(ptr[-1]), np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
    ex.client_class = dict.fromkeys(range(n), "c")
    jobs = [FitJob(i, 0, 1, 0) for i in range(n)]
    idx = list(range(n))
    assert len(ex._chunks(jobs, idx, 2, "fit", "c")) == 2  # nothing measured yet: one call per actor

    def trained(secs_per_client: float) -> list[FitResult]:
        out = ClientOutput(Message(), None, 100, 100, 1, {})
        return [FitResult(i, 0, out, wall_s=secs_per_client) for i in range(n)]

    ex._learn_rate(jobs, trained(0.001))  # 20 ms of work in all: stays one call per actor
    assert ex._rate["c"] == pytest.approx(0.001 / 100)
    assert len(ex._chunks(jobs, idx, 2, "fit", "c")) == 2
    ex._learn_rate(jobs, trained(TARGET_CHUNK_S / 2))  # 1 s of work: ten calls of about 0.1 s
    chunks = ex._chunks(jobs, idx, 2, "fit", "c")
    assert len(chunks) == 10 and all(len(c) == 2 for c in chunks)
    ex._learn_rate(jobs, trained(1.5 * TARGET_CHUNK_S / n))  # 0.15 s: not 1 call of 0.1 s and one
    assert len(ex._chunks(jobs, idx, 2, "fit", "c")) == 2   # of 0.05 s, but one per actor
    assert len(ex._chunks(jobs, idx, 3, "fit", "c")) == 3
    ex._learn_rate(jobs, trained(5 * TARGET_CHUNK_S / n))  # 0.5 s on 2 actors: 6 calls, 3 each
    assert len(ex._chunks(jobs, idx, 2, "fit", "c")) == 6
    assert len(ex._chunks(jobs, idx, 2, "evaluate", "c")) == 2  # evaluation: one call per actor


@pytest.mark.usefixtures("ray_session")
def test_rounds_split_by_measured_speed_on_real_actors_give_the_sequential_metrics(tmp_path, monkeypatch):
    """With a tiny target call length every round after the first is cut into one call per
    client, fed to whichever actor is free: the metrics are the sequential executor's."""
    from cafe_ray.sim import executor
    from cafe_ray.sim.engine import _ray_factory
    from cafe_ray.sim.simulation import Simulation

    sets = ("round.num_rounds=3", "algorithm.name=fedper_ee", "round.fraction=1.0", "data.num_clients=7")
    seq_dir, _ = run_simulation(tiny_cfg(tmp_path / "s", *sets, executor="sequential"), show_progress=False)
    monkeypatch.setattr(executor, "TARGET_CHUNK_S", 1e-9)
    calls: list[int] = []
    chunks = executor.RayExecutor._chunks

    def counted(self, jobs, idx, n_actors, method, name):
        out = chunks(self, jobs, idx, n_actors, method, name)
        if method == "fit":
            calls.append(len(out))
        return out

    monkeypatch.setattr(executor.RayExecutor, "_chunks", counted)
    sim = Simulation(tiny_cfg(tmp_path / "r", *sets), tmp_path / "run", _ray_factory)
    try:
        sim.run()
    finally:
        sim.executor.shutdown()
    assert calls == [2, 7, 7]  # round 0 knows no speed yet: one call per actor
    assert comparable(rundir.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == \
        comparable(rundir.read_jsonl(seq_dir / "metrics.jsonl"))
