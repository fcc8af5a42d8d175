"""Vectorized client cohorts (engine.vectorize): batched local SGD equals the per-client path."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from cafe_ray.algorithms import RoundContext, build_algorithm, get_algorithm
from cafe_ray.config import build_config
from cafe_ray.data import load_dataset, partition_clients
from cafe_ray.models import make_model
from cafe_ray.runs import rundir
from cafe_ray.sim import seeds
from cafe_ray.sim.cohort import cohort_runs, even_runs, split_cohorts
from cafe_ray.sim.engine import print_summary, run_simulation
from cafe_ray.sim.runner import ClientRunner, FitJob
from tests.sim.conftest import comparable, tiny_cfg


def _setup(tmp_path, algo: str, vectorize: bool | str = True, n: int = 7, **alg):
    cfg = build_config({
        "data": {"name": "digits", "num_clients": n, "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 20}},
        "model": {"name": "cnn_small", "width": 8}, "algorithm": {"name": algo, **alg},
        "train": {"local_epochs": 2, "batch_size": 16, "weight_decay": 1e-4, "momentum": 0.9},
        "engine": {"vectorize": vectorize},
    })
    ds = load_dataset(cfg.data, seed=0)
    splits = partition_clients(ds, cfg.data, seed=0)
    alg = build_algorithm(cfg)
    state = alg.init_server_state(make_model(cfg, ds))
    payloads = alg.server_payloads(state, RoundContext(0, 2, 0, tuple(range(n))))
    jobs = [FitJob(i, 0, 2, seeds.derive_seed(0, 0, i, seeds.TRAIN), payload=payloads[i]) for i in range(n)]
    return cfg, ds, splits, jobs


FEDROD = [{"personal_ce": ce, "personal_generic": g, "personal_init": i}
          for ce, g, i in [("detached", "live", "zero"), ("backbone", "live", "generic"),
                           ("detached", "received", "prior"), ("backbone", "received", "prior")]]


@pytest.mark.parametrize(("algo", "opts"), [("fedavg_ee", None), ("fedper_ee", None)]
                         + [("fedrod_ee", o) for o in FEDROD])
def test_vectorized_cohort_matches_plain_training(tmp_path, algo, opts):
    """Every vectorizable algorithm; FedRoD-EE in each form of its personal loss (its own batched loss)."""
    cfg, ds, splits, jobs = _setup(tmp_path, algo, **({"fedrod": opts} if opts else {}))
    sizes = {len(s.train_idx) for s in splits}
    assert len(sizes) > 1  # clients run out of data at different steps: the masks matter
    plain_runner = ClientRunner(cfg, ds, splits, tmp_path / "plain")
    vec_runner = ClientRunner(cfg, ds, splits, tmp_path / "vec")
    assert vec_runner.vectorizes
    plain = [plain_runner.fit(j) for j in jobs]
    vec = vec_runner.fit_many(jobs)
    for a, b in zip(plain, vec, strict=True):
        assert a.client_id == b.client_id
        assert a.output.samples_processed == b.output.samples_processed
        assert a.output.num_samples == b.output.num_samples
        assert a.output.metrics["train_loss"] == pytest.approx(b.output.metrics["train_loss"], rel=1e-4)
        ua, ub = a.output.upload.tensors, b.output.upload.tensors
        assert ua.keys() == ub.keys()
        for k in ua:
            torch.testing.assert_close(ub[k], ua[k], rtol=1e-4, atol=1e-5)
        assert b.worker["cohort"] == len(jobs)
    if algo != "fedavg_ee":  # personal state (heads, residual heads) is staged as on the plain path
        for j in jobs:
            plain_runner.store.commit(j.client_id, 0)
            vec_runner.store.commit(j.client_id, 0)
            pa, pb = plain_runner.store.load(j.client_id), vec_runner.store.load(j.client_id)
            for k in pa:
                torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)


def test_vectorized_cohort_is_deterministic(tmp_path):
    cfg, ds, splits, jobs = _setup(tmp_path, "fedavg_ee")
    a = ClientRunner(cfg, ds, splits, tmp_path / "a").fit_many(jobs)
    b = ClientRunner(cfg, ds, splits, tmp_path / "b").fit_many(jobs)
    for x, y in zip(a, b, strict=True):
        for k, v in x.output.upload.tensors.items():
            assert torch.equal(v, y.output.upload.tensors[k])


def test_unsupported_algorithm_trains_one_by_one(tmp_path):
    cfg, ds, splits, jobs = _setup(tmp_path, "fedprox_ee")
    runner = ClientRunner(cfg, ds, splits, tmp_path / "p")
    assert not runner.vectorizes  # FedProx changes the loss: it does not inherit FedAvg's promise
    assert all("cohort" not in r.worker for r in runner.fit_many(jobs))
    assert all(get_algorithm(a).supports_vectorize() for a in ("fedavg_ee", "fedper_ee", "fedrod_ee"))
    assert not get_algorithm("fedprox_ee").supports_vectorize()


def test_cohorts_never_depend_on_actor_count():
    class J:
        def __init__(self, c: int) -> None:
            self.client_id = c

    jobs = [J(c) for c in range(10)]
    classes = {c: "a" if c % 3 else "b" for c in range(10)}
    assert split_cohorts(jobs, 4, classes) == [[0, 3, 6, 9], [1, 2, 4], [5, 7, 8]]


def test_cohorts_group_clients_of_about_the_same_local_work():
    """A cohort trains as many steps as its longest member: similar clients waste the least."""
    work = [5, 90, 7, 88, 6, 91]
    assert cohort_runs(list(range(6)), 3, lambda i: work[i]) == [[0, 4, 2], [3, 1, 5]]
    assert cohort_runs([0, 1, 2], 3, lambda i: 1.0) == [[0, 1, 2]]  # ties keep their order

    class J:
        def __init__(self, c: int) -> None:
            self.client_id = c

    jobs = [J(c) for c in range(6)]
    assert split_cohorts(jobs, 3, None, lambda j: work[j.client_id]) == [[0, 4, 2], [3, 1, 5]]


def test_cohorts_are_even_runs_of_at_most_the_size():
    assert [len(c) for c in even_runs(list(range(50)), 16)] == [13, 13, 12, 12]
    assert even_runs([4, 5, 6], 16) == [[4, 5, 6]]
    assert even_runs(list(range(32)), 16) == [list(range(16)), list(range(16, 32))]
    assert even_runs([], 16) == []


@pytest.mark.slow  # two vectorized runs on real actors and one in process, per algorithm
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("algo", ["fedper_ee", "fedrod_ee"])
def test_vectorized_engine_same_metrics_for_one_and_two_actors_and_sequential(tmp_path, algo):
    """FedRoD-EE: its batched loss and residual heads (extras) cross actors and the state store."""
    sets = ("round.num_rounds=2", f"algorithm.name={algo}", "round.fraction=1.0", "data.num_clients=7",
            "engine.vectorize=true", "engine.chunk_clients=3")
    runs = [tiny_cfg(tmp_path / "s", *sets, executor="sequential"),
            tiny_cfg(tmp_path / "1", *sets, "profiles.actors_per_class=1"),
            tiny_cfg(tmp_path / "2", *sets, "profiles.actors_per_class=2")]
    dirs = [run_simulation(c, show_progress=False)[0] for c in runs]
    metrics = [comparable(rundir.read_jsonl(d / "metrics.jsonl")) for d in dirs]
    assert metrics[0] == metrics[1] == metrics[2]
    assert metrics[0][-1]["acc_avg_exit"] > 0.3
    assert len({r["pid"] for r in rundir.read_jsonl(dirs[2] / "clients.jsonl")}) == 2


def test_auto_measures_both_ways_then_keeps_one_and_says_which(tmp_path):
    cfg, ds, splits, jobs = _setup(tmp_path, "fedavg_ee", vectorize="auto")
    runner = ClientRunner(cfg, ds, splits, tmp_path / "auto")
    plain = [ClientRunner(cfg, ds, splits, tmp_path / "plain").fit(j) for j in jobs]
    notes, cohorts = [], []
    for _ in range(7):
        got = runner.fit_many(jobs)
        notes.append(got[0].worker["vectorize"])
        cohorts.append("cohort" in got[0].worker)
        for a, b in zip(plain, got, strict=True):  # either way: the plain path's numbers
            for k, v in a.output.upload.tensors.items():
                torch.testing.assert_close(b.output.upload.tensors[k], v, rtol=1e-4, atol=1e-5)
    assert cohorts[:6] == [True, False] * 3
    assert notes[:5] == ["auto: measuring"] * 5
    assert notes[5] == notes[6] and notes[6].startswith(("auto: on", "auto: off"))
    assert cohorts[6] == notes[6].startswith("auto: on")


def test_auto_run_records_the_choice_per_class(tmp_path):
    cfg = tiny_cfg(tmp_path, "engine.vectorize=auto", "round.fraction=1.0", "round.num_rounds=7",
                   executor="sequential")
    run_dir, summary = run_simulation(cfg, show_progress=False)
    (notes,) = summary["vectorize"].values()  # one resource class, one actor: one decision
    assert len(notes) == 1 and notes[0].startswith(("auto: on", "auto: off"))
    console = Console(record=True, width=200)
    print_summary(summary, console)
    (row,) = [ln for ln in console.export_text().splitlines() if "batched cohorts" in ln]
    assert f"default: {notes[0]}" in row
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    assert {r["cohort"] for r in recs if r["round"] == 0} == {6}  # round 0: the first cohort, batched
    assert {r["cohort"] for r in recs if r["round"] == 1} == {None}  # round 1: measured one by one
