"""The engine on real Ray: coordinator actor, client actor pools, resume, faults."""

import pytest

from cafe_ray.runs import rundir
from cafe_ray.sim.engine import run_simulation, start, wait_for
from tests.sim.conftest import comparable, tiny_cfg

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(cfg, **kw):
    return run_simulation(cfg, show_progress=False, **kw)


# FedAvg-EE on Ray in every run of the suite; the others in `make test-all` (each is a run on real actors)
@pytest.mark.parametrize("algo", ["fedavg_ee", *(pytest.param(a, marks=pytest.mark.slow) for a in
                                                  ("fedprox_ee", "fedper_ee", "local_ee"))])
def test_each_algorithm_learns_on_ray(tmp_path, algo):
    cfg = tiny_cfg(tmp_path, f"algorithm.name={algo}", "round.num_rounds=4", "round.fraction=1.0")
    run_dir, s = _run(cfg)
    assert s["acc_avg_exit"] > 0.5, s  # chance is 0.1
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    assert {r["node_id"] for r in recs} and all(r["status"] == "ok" for r in recs)
    assert len({r["pid"] for r in recs}) == 2  # two actors in the pool, both used


@pytest.mark.slow  # three runs on real actors and one in process
def test_ray_equals_sequential_and_one_vs_two_actors(tmp_path):
    seq = tiny_cfg(tmp_path / "s", "round.num_rounds=3", "algorithm.name=fedper_ee", executor="sequential")
    one = tiny_cfg(tmp_path / "1", "round.num_rounds=3", "algorithm.name=fedper_ee", "profiles.actors_per_class=1")
    two = tiny_cfg(tmp_path / "2", "round.num_rounds=3", "algorithm.name=fedper_ee", "profiles.actors_per_class=2")
    runs = [_run(c)[0] for c in (seq, one, two)]
    metrics = [comparable(rundir.read_jsonl(r / "metrics.jsonl")) for r in runs]
    assert metrics[0] == metrics[1] == metrics[2]
    assert len({r["pid"] for r in rundir.read_jsonl(runs[1] / "clients.jsonl")}) == 1
    assert len({r["pid"] for r in rundir.read_jsonl(runs[2] / "clients.jsonl")}) == 2


@pytest.mark.slow  # a killed coordinator, a resume and an uninterrupted run
def test_resume_after_killed_coordinator_equals_uninterrupted(tmp_path, ray_session):
    ray = ray_session
    sets = ("round.num_rounds=6", "checkpoint.every=2", "algorithm.name=fedper_ee", "train.local_epochs=2")
    full_dir, full = _run(tiny_cfg(tmp_path / "full", *sets))

    from cafe_ray.sim.engine import prepare_run

    cfg, run_dir, _ = prepare_run(tiny_cfg(tmp_path / "crash", *sets), None)
    actor, fut = start(cfg, run_dir, resume=False)
    assert wait_for(lambda: ray.get(actor.progress.remote())["round"] >= 3, timeout=300)
    ray.kill(actor)  # the coordinator dies; its client actors die with it
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(fut)
    assert rundir.latest_checkpoint(run_dir) is not None
    resumed_dir, resumed = _run(None, resume_dir=run_dir)
    assert resumed_dir == run_dir
    for key in ("acc_exit", "acc_avg_exit", "acc_worst_client", "virtual_time_s", "cum_bytes_down", "cum_bytes_up"):
        assert resumed[key] == full[key], key
    assert comparable(rundir.read_jsonl(run_dir / "metrics.jsonl")) == comparable(
        rundir.read_jsonl(full_dir / "metrics.jsonl"))


@pytest.mark.slow  # an actor killed mid-run and restarted by Ray
def test_killed_client_actor_does_not_stop_the_run(tmp_path, ray_session):
    ray = ray_session
    # one actor: with no live actor left in its pool, the executor must wait for Ray's restart
    # (a pool that still has live actors carries on without it: tests/cluster/ covers node loss)
    cfg = tiny_cfg(tmp_path, "round.num_rounds=5", "round.fraction=1.0", "train.local_epochs=3",
                   "round.eval_every=5", "profiles.actors_per_class=1")
    from cafe_ray.sim.engine import prepare_run

    cfg, run_dir, _ = prepare_run(cfg, None)
    actor, fut = start(cfg, run_dir, resume=False)
    assert wait_for(lambda: ray.get(actor.progress.remote())["round"] >= 1, timeout=300)
    victims = ray.get(actor.client_actors.remote())
    ray.kill(victims[0], no_restart=False)
    summary = ray.get(fut, timeout=600)
    assert summary["rounds"] == 5
    assert summary["failed_total"] >= 1
    recs = rundir.read_jsonl(run_dir / "clients.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert failed and all("worker died" in r["reason"] for r in failed)
    # the executor waits for the restarted actor: the rounds after the crash are whole again
    crash_round = max(r["round"] for r in failed)
    later = [r for r in recs if r["round"] > crash_round]
    assert crash_round < 4 and later and all(r["status"] == "ok" for r in later)
    before = {r["pid"] for r in recs if r["round"] < crash_round}
    assert {r["pid"] for r in later} - before  # a new worker process took over
    ray.kill(actor)


@pytest.mark.slow  # a run with three resource classes
def test_resource_classes_get_their_ray_resources(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "round.num_rounds=1", "round.fraction=1.0", "profiles.catalog=iot_mix",
        "round.eval_every=1", "data.num_clients=10",
        "profiles.classes.phone={num_cpus: 0.5, actors: 1}",
        "profiles.classes.single_board={num_cpus: 0.25, actors: 1, resources: {cafe_test: 1}}",
        "profiles.classes.edge_gpu={num_cpus: 1.0, actors: 1}",
    )
    run_dir, _ = _run(cfg)
    recs = [r for r in rundir.read_jsonl(run_dir / "clients.jsonl") if r["status"] == "ok"]
    by_class = {}
    for r in recs:
        by_class.setdefault(r["resource_class"], set()).add(tuple(sorted(r["actor_resources"].items())))
    assert by_class["phone"] == {(("CPU", 0.5),)}
    assert by_class["single_board"] == {(("CPU", 0.25), ("cafe_test", 1.0))}
    assert by_class["edge_gpu"] == {(("CPU", 1.0),)}
    pids = {c: {r["pid"] for r in recs if r["resource_class"] == c} for c in by_class}
    assert not (pids["phone"] & pids["single_board"])


def test_error_inside_the_coordinator_is_unwrapped_the_same_on_both_executors(tmp_path):
    """With an address the data is the cluster's to check, so a missing dataset fails inside
    the coordinator (Ray) or in-process (sequential): the same one-line reason either way,
    the original exception as the cause, and no run directory left behind."""
    from cafe_ray.data.base import DatasetNotFoundError
    from cafe_ray.sim.errors import RunFailed

    reasons = {}
    for ex in ("ray", "sequential"):
        cfg = tiny_cfg(tmp_path / ex, "data.name=cifar10", f"data.root={tmp_path / 'no-data'}", executor=ex)
        with pytest.raises(RunFailed) as info:
            _run(cfg, address="auto")
        assert isinstance(info.value.__cause__, DatasetNotFoundError)
        assert info.value.run_dir is None and not any((tmp_path / ex / "runs").iterdir())
        reasons[ex] = info.value.reason
    assert reasons["ray"] == reasons["sequential"]
    assert reasons["ray"].startswith("data.name=cifar10: CIFAR-10 not found")
    assert "Traceback" not in reasons["ray"]


@pytest.mark.slow  # a CLI run in its own Ray
def test_coordinator_warnings_reach_the_terminal_and_the_run_dir(tmp_path):
    import io

    from rich.console import Console

    from cafe_ray.sim.preflight import PreflightReport

    cfg = tiny_cfg(tmp_path, "data.num_clients=200", "round.num_rounds=1", "round.fraction=0.02",
                   "round.eval_clients=participants")
    out = io.StringIO()
    # an empty preflight report: the warning can only come from the coordinator actor
    run_dir, _ = run_simulation(cfg, show_progress=False, console=Console(file=out, width=400),
                                checked=PreflightReport())
    (rec,) = rundir.read_warnings(run_dir)
    assert rec["source"] == "coordinator"
    assert "min_size=20 is infeasible for 1438 samples over 200 clients" in rec["message"]
    assert f"warning (coordinator): {rec['message']}" in out.getvalue()
