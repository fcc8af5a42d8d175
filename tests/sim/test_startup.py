"""Start-up: the run reuses the data preflight loaded and partitioned (same splits), and pools
started a moment ago are not grown on resources their own actors have not taken yet."""

from __future__ import annotations

import numpy as np
import pytest

from cafe_ray.runs import rundir
from cafe_ray.sim import plan as plan_mod
from cafe_ray.sim.engine import _sequential_factory, run_simulation
from cafe_ray.sim.plan import as_client_splits, load_data
from cafe_ray.sim.preflight import preflight
from cafe_ray.sim.simulation import Simulation
from tests.sim.conftest import comparable, tiny_cfg


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):
        pytest.fail("the run loaded or partitioned the data again instead of reusing preflight's")

    monkeypatch.setattr(plan_mod, "load_dataset", fail)
    monkeypatch.setattr(plan_mod, "partition_clients", fail)


def _same_splits(a, b) -> bool:
    a, b = as_client_splits(a), as_client_splits(b)
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("train_ptr", "train_idx", "test_ptr", "test_idx", "val_ptr", "val_idx"))


@pytest.mark.parametrize("sets", [(), ("data.name=synthetic", "data.partition.kind=iid", "data.num_clients=3000",
                                       "data.synthetic_samples=9000", "data.val_fraction=0.2")])
def test_preflight_keeps_exactly_the_data_the_run_would_load(tmp_path, sets):
    cfg = tiny_cfg(tmp_path, *sets)
    kept = preflight(cfg, keep_data=True).plan
    ds, splits = load_data(cfg)
    assert kept is not None and kept.has_data and _same_splits(kept.splits, splits)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(kept.dataset, k), getattr(ds, k))
    assert not preflight(cfg).plan.has_data  # only kept when asked: `cafe-ray validate` holds nothing


def test_run_simulation_reuses_the_preflight_data(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "a", "round.num_rounds=2", executor="sequential")
    reference = Simulation(cfg, tmp_path / "ref", _sequential_factory).run()
    report = preflight(cfg, keep_data=True)
    _no_loading(monkeypatch)
    run_dir, summary = run_simulation(cfg, show_progress=False, checked=report)
    assert not report.plan.has_data  # handed to the run: the caller's report no longer holds the data
    assert summary["acc_exit"] == reference["acc_exit"]
    assert comparable(rundir.read_jsonl(run_dir / rundir.METRICS)) == comparable(
        rundir.read_jsonl(tmp_path / "ref" / rundir.METRICS))
    assert _same_splits(rundir.load_splits(run_dir / rundir.SPLITS), rundir.load_splits(tmp_path / "ref" / rundir.SPLITS))


@pytest.mark.usefixtures("ray_session")
def test_coordinator_uses_the_drivers_object_refs_and_loads_nothing(tmp_path, monkeypatch):
    """The coordinator actor's body with the refs the driver put: the client actors train on them
    and every metric equals a run that loaded the data itself."""
    import ray

    from cafe_ray.sim.engine import Coordinator

    sets = ("round.num_rounds=2", "round.fraction=1.0")
    reference = Simulation(tiny_cfg(tmp_path / "s", *sets, executor="sequential"), tmp_path / "ref",
                           _sequential_factory).run()
    cfg = tiny_cfg(tmp_path / "r", *sets)
    plan = preflight(cfg, keep_data=True).plan
    refs = [ray.put(plan.dataset), ray.put(plan.splits)]
    plan = plan.without_data()
    _no_loading(monkeypatch)
    monkeypatch.setattr(rundir, "capture_warnings", lambda *a, **k: (lambda: None))  # the actor's, not this process's
    coord = Coordinator(plan, str(tmp_path / "run"), False, refs)
    summary = coord.run()
    sim = coord.sim
    assert not sim.dataset.x_train.flags.writeable and not sim.dataset.x_train.flags.owndata  # the store's views
    assert sim.executor._data_refs is refs  # the actors got the driver's refs: nothing was put again
    assert summary["acc_exit"] == reference["acc_exit"]
    assert comparable(rundir.read_jsonl(tmp_path / "run" / rundir.METRICS)) == comparable(
        rundir.read_jsonl(tmp_path / "ref" / rundir.METRICS))


class _FakeRay:
    """What RayExecutor._grow asks Ray: free resources, and whether the attach calls are done."""

    def __init__(self, free: dict[str, float]) -> None:
        self.free, self.placed = free, False

    def available_resources(self) -> dict[str, float]:
        return dict(self.free)

    def wait(self, refs: list, num_returns: int, timeout: float) -> tuple[list, list]:
        return (list(refs), []) if self.placed else ([], list(refs))


def test_pools_do_not_grow_on_the_cpus_of_actors_not_placed_yet(tmp_path):
    """iot_mix wants 3.5 CPUs of actors on a 2-CPU machine, so its pools start shrunk to one actor
    each (1.75 CPUs). Until Ray has placed those actors it still shows their CPUs as free: growing
    on them would add actors that never get a CPU, and a round that waits for them forever."""
    from cafe_ray.sim.executor import RayExecutor
    from cafe_ray.sim.profiles import resolve_catalog

    wanted = resolve_catalog(tiny_cfg(tmp_path, "profiles.catalog=iot_mix").profiles).classes
    ex = RayExecutor.__new__(RayExecutor)  # the growth rule alone: no cluster needed
    fake = _FakeRay({"CPU": 2.0})  # nothing deducted yet: the pools' actors are not placed
    created: list[str] = []
    ex.ray, ex.wanted, ex.notes = fake, list(wanted), []
    ex.pools = {c.name: ["actor"] for c in wanted}
    ex._attached = ["attach call"] * 3
    ex._new_actor = lambda c: created.append(c.name) or "new actor"
    ex._grow()
    assert created == [] and all(len(p) == 1 for p in ex.pools.values())
    fake.placed, fake.free = True, {"CPU": 0.25}  # placed: what is left is really free
    ex._grow()
    assert created == ["single_board"] and ex.notes == ["nodes joined; pools grown: single_board 1 -> 2"]


def test_builtin_algorithm_names_match_the_registry():
    """preflight checks algorithm.name against BUILTIN_ALGORITHMS without importing the algorithms."""
    from cafe_ray.algorithms import available
    from cafe_ray.config import BUILTIN_ALGORITHMS
    from cafe_ray.sim.preflight import algorithm_names

    assert sorted(BUILTIN_ALGORITHMS) == available()
    assert algorithm_names() == available()


def test_builtin_vectorizable_names_match_the_classes(tmp_path):
    """preflight warns, without importing the algorithms, when engine.vectorize is asked of one
    that trains one client at a time."""
    from cafe_ray.algorithms import available, get_algorithm
    from cafe_ray.config import BUILTIN_VECTORIZABLE

    assert sorted(BUILTIN_VECTORIZABLE) == [n for n in available() if get_algorithm(n).supports_vectorize()]
    warned = preflight(tiny_cfg(tmp_path, "algorithm.name=fedprox_ee", "engine.vectorize=auto",
                                executor="sequential")).warnings
    assert any(w.startswith("engine.vectorize=auto: fedprox_ee does not train in batched cohorts") for w in warned)
    for quiet in ("algorithm.name=fedrod_ee", "engine.vectorize=off"):
        warned = preflight(tiny_cfg(tmp_path, "algorithm.name=fedprox_ee", "engine.vectorize=on", quiet,
                                    executor="sequential")).warnings
        assert not any("batched cohorts" in w for w in warned)


def test_a_registered_algorithm_passes_preflight(tmp_path):
    from cafe_ray.algorithms import base
    from cafe_ray.algorithms.fedavg import FedAvgEE

    class Mine(FedAvgEE):
        name = "mine_ee"

    base.register(Mine)
    try:
        preflight(tiny_cfg(tmp_path, "algorithm.name=mine_ee", executor="sequential"))
    finally:
        base._REGISTRY.pop("mine_ee")


def test_the_driver_checks_and_starts_a_run_without_importing_torch(tmp_path):
    """`cafe-ray simulate`'s driver side up to ray.init (CLI, config, preflight, engine) imports no
    torch but for the model check, which runs in a thread while Ray starts (the workers import
    torch themselves, preloaded): the driver would otherwise pay about 1 s before Ray starts."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; import cafe_ray.cli; from cafe_ray.config import load_config; "
            "from cafe_ray.sim import preflight as P; from cafe_ray.sim import engine; "
            "P._check_model = lambda cfg, ds: None; "
            f"cfg = load_config(Path('simulations/quickstart.yaml'), ['output_dir={tmp_path}']); "
            "r = P.preflight(cfg, keep_data=True); assert r.plan.has_data; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_model_check_in_the_background_raises_on_finish(tmp_path, monkeypatch):
    """The build in the background is the last check, behind the zoo's rules that preflight applies
    before Ray starts: a model those rules let through and that still cannot be built fails here."""
    from cafe_ray.config import ConfigError
    from cafe_ray.sim import preflight as preflight_mod

    with pytest.raises(ConfigError, match="model.name='transformer4' does not fit dataset 'digits'"):
        preflight(tiny_cfg(tmp_path, "model.name=transformer4"), model_in_background=True)
    monkeypatch.setattr(preflight_mod, "check_inputs", lambda *a, **k: None)  # a rule the zoo forgot
    report = preflight(tiny_cfg(tmp_path, "model.name=transformer4"), model_in_background=True)
    with pytest.raises(ConfigError, match="model.name=transformer4: cannot build it"):
        report.finish()
    assert report.finish() is report  # waited once: nothing pending any more
    assert preflight(tiny_cfg(tmp_path), model_in_background=True).finish().pending is None
