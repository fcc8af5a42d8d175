"""One resolved plan per run: `cafe-ray simulate` resolves the device catalog and partitions the
data exactly once, however many parts of the run read them (preflight, the autoscaler request,
the client actor pools, the coordinator, the round loop)."""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cafe_ray.data.partition
import cafe_ray.sim.profiles
from cafe_ray.cli import app
from cafe_ray.sim import engine
from cafe_ray.sim.engine import Coordinator
from cafe_ray.sim.plan import RunPlan, load_data
from tests.sim.conftest import tiny_cfg

COUNTED = {"resolve_catalog": cafe_ray.sim.profiles, "partition_clients": cafe_ray.data.partition}


def count_calls(patch: Callable[[Any, str, Any], None]) -> Counter:
    """Count every call of the functions in COUNTED made in this process from now on.

    Each is wrapped in its home module and in every ``cafe_ray`` module that imported it by
    name, so no caller escapes the count; a module imported later takes the wrapped one.
    """
    counts: Counter = Counter()
    for name, home in COUNTED.items():
        fn = getattr(home, name)

        def counted(*args: Any, _fn: Callable = fn, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _fn(*args, **kwargs)

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("cafe_ray") and getattr(mod, name, None) is fn:
                patch(mod, name, counted)
    return counts


class CountingCoordinator(Coordinator):
    """The coordinator actor, counting the calls made in its own process (the driver's count
    cannot see them); the counts come back with the summary."""

    def run(self) -> dict[str, Any]:
        counts = count_calls(setattr)  # this actor's process ends with the run
        summary = super().run()
        return {**summary, "coordinator_calls": dict(counts)}


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"""name: t
output_dir: {tmp_path / 'runs'}
data: {{name: digits, num_clients: 6, partition: {{kind: dirichlet, alpha: 1.0, min_size: 20}}}}
model: {{name: cnn_small, width: 8}}
algorithm: {{name: fedavg_ee}}
train: {{local_epochs: 1, batch_size: 32, max_steps: 2}}
round: {{num_rounds: 2, fraction: 0.5, eval_every: 2}}
profiles: {{catalog: iot_mix, actors_per_class: 1}}
checkpoint: {{every: 1}}
""")
    return p


def test_simulate_sequential_resolves_the_catalog_and_partitions_the_data_once(tmp_path, monkeypatch):
    counts = count_calls(monkeypatch.setattr)
    r = CliRunner().invoke(app, ["simulate", str(_config(tmp_path)), "--no-progress", "--set", "executor=sequential"])
    assert r.exit_code == 0, r.output
    assert counts == {"resolve_catalog": 1, "partition_clients": 1}


@pytest.mark.slow  # a CLI run on Ray with counting hooks
@pytest.mark.usefixtures("ray_session")
def test_simulate_on_ray_resolves_the_catalog_and_partitions_the_data_once(tmp_path, monkeypatch):
    """Driver (preflight, autoscaler request) and coordinator actor (pools, round loop) together."""
    counts = count_calls(monkeypatch.setattr)
    monkeypatch.setattr(engine, "Coordinator", CountingCoordinator)
    in_actor: list[dict | None] = []
    shown = engine.print_summary
    monkeypatch.setattr(engine, "print_summary", lambda s, c: (in_actor.append(s.get("coordinator_calls")), shown(s, c)))
    r = CliRunner().invoke(app, ["simulate", str(_config(tmp_path)), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert counts == {"resolve_catalog": 1, "partition_clients": 1}  # both in preflight, in the driver
    assert in_actor == [{}]  # the coordinator actor resolved and partitioned nothing again


def test_the_plan_travels_without_its_arrays(tmp_path):
    cfg = tiny_cfg(tmp_path, "profiles.catalog=iot_mix", "profiles.classes.phone.actors=3")
    plan = RunPlan.resolve(cfg, load_data(cfg))
    assert plan.has_data and len(plan.splits) == cfg.data.num_clients
    assert [c.actors for c in plan.classes] == [3, 2, 2]  # profiles.classes applied once, here
    small = plan.without_data()
    assert not small.has_data and small == plan  # same run, arrays left behind
    assert len(pickle.dumps(small)) < len(pickle.dumps(plan.dataset)) // 10
    ds, splits = small.data()  # a plan without data loads them where it runs
    assert len(splits) == cfg.data.num_clients and ds.num_classes == plan.dataset.num_classes
