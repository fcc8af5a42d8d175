"""Driver side: start the coordinator actor, follow its progress, print the result.

The coordinator (a Ray actor, zero CPUs of its own) owns the round loop; the
driver only starts it and polls ``progress()``, so a laptop, a local multi-node
cluster and a cloud cluster differ only in the Ray address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cafe_ray.config import ExperimentConfig, load_config
from cafe_ray.runs import rundir
from cafe_ray.sim.executor import RayExecutor, SequentialExecutor
from cafe_ray.sim.simulation import Simulation


def _ray_factory(**kw: Any) -> RayExecutor:
    return RayExecutor(**kw)


def _sequential_factory(*, cfg, dataset, splits, store_root, classes, client_class) -> SequentialExecutor:  # noqa: ANN001
    return SequentialExecutor(cfg, dataset, splits, store_root)


class Coordinator:
    """Ray actor body: holds the Simulation; ``run`` and ``progress`` run concurrently."""

    def __init__(self, cfg_json: str, run_dir: str, resume: bool) -> None:
        cfg = ExperimentConfig.model_validate_json(cfg_json)
        self.sim = Simulation(cfg, run_dir, _ray_factory, resume=resume)

    def run(self) -> dict[str, Any]:
        return self.sim.run()

    def progress(self) -> dict[str, Any]:
        return dict(self.sim.progress.__dict__)

    def actor_info(self) -> list[dict]:
        return self.sim.executor.actor_info()  # type: ignore[attr-defined]

    def client_actors(self) -> list:
        """Handles of the client actors (fault-injection tests kill one)."""
        return [a for pool in self.sim.executor.pools.values() for a in pool]  # type: ignore[attr-defined]


def run_here(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the round loop in *this* process with the executor ``cfg.executor`` names.

    For callers that already are a Ray worker with their own resources, e.g. a Ray
    Tune trial (cafe_ray.studies.sweep): the client actors become this process's children and
    land in its placement group. Returns the summary.
    """
    factory = _sequential_factory if cfg.executor == "sequential" else _ray_factory
    return Simulation(cfg, run_dir, factory, resume=resume).run(on_round)


def prepare_run(cfg: ExperimentConfig | None, resume_dir: str | Path | None) -> tuple[ExperimentConfig, Path, bool]:
    """Resolve (config, run dir, resume?) from either a config or a run directory."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there; pass a run directory made by `cafe-ray simulate`")
        return load_config(run_dir / "config.yaml"), run_dir, True
    if cfg is None:
        raise ValueError("pass a config or a run directory to resume")
    return cfg, rundir.new_run_dir(cfg), False


def ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def start(cfg: ExperimentConfig, run_dir: Path, resume: bool, address: str | None = None):  # noqa: ANN201
    """Start the coordinator actor; returns (actor handle, run() future)."""
    import ray

    ensure_ray(address)
    actor = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=4).remote(
        cfg.model_dump_json(), str(run_dir.resolve()), resume)
    return actor, actor.run.remote()


def run_simulation(
    cfg: ExperimentConfig | None = None,
    *,
    resume_dir: str | Path | None = None,
    address: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) one simulation to its last round; returns (run dir, summary)."""
    cfg, run_dir, resume = prepare_run(cfg, resume_dir)
    console = console or Console()
    console.print(f"[bold]cafe-ray[/] {cfg.algorithm.name} on {cfg.data.name}: "
                  f"{cfg.data.num_clients} clients, {cfg.round.num_rounds} rounds -> {run_dir}")
    if cfg.executor == "sequential":
        sim = Simulation(cfg, run_dir, _sequential_factory, resume=resume)
        summary = _follow_local(sim, console, show_progress)
    else:
        import ray

        actor, fut = start(cfg, run_dir, resume, address)
        summary = _follow(actor, fut, cfg, console, show_progress)
        ray.kill(actor)
    print_summary(summary, console)
    return run_dir, summary


def _bar(console: Console, total: int, show: bool) -> Progress:
    return Progress(
        TextColumn("round {task.completed}/{task.total}"), BarColumn(),
        TextColumn("acc {task.fields[acc]}"), TextColumn("virtual {task.fields[vt]}"),
        TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
        console=console, disable=not show, transient=False,
    )


def _fields(p: dict[str, Any]) -> dict[str, Any]:
    acc = p.get("acc_avg_exit")
    return {"acc": f"{100 * acc:.1f}%" if acc is not None else "-",
            "vt": f"{p.get('virtual_time_s', 0.0):.0f}s", "failed": p.get("failed_total", 0)}


def _follow(actor, fut, cfg: ExperimentConfig, console: Console, show: bool) -> dict[str, Any]:  # noqa: ANN001
    import ray

    with _bar(console, cfg.round.num_rounds, show) as bar:
        task = bar.add_task("sim", total=cfg.round.num_rounds, acc="-", vt="0s", failed=0)
        while True:
            done, _ = ray.wait([fut], timeout=0.5)
            try:
                p = ray.get(actor.progress.remote(), timeout=10)
                bar.update(task, completed=p["round"], **_fields(p))
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
            if done:
                return ray.get(fut)


def _follow_local(sim: Simulation, console: Console, show: bool) -> dict[str, Any]:
    with _bar(console, sim.cfg.round.num_rounds, show) as bar:
        task = bar.add_task("sim", total=sim.cfg.round.num_rounds, acc="-", vt="0s", failed=0)

        def on_round(_: dict[str, Any]) -> None:
            bar.update(task, completed=sim.progress.round, **_fields(sim.progress.__dict__))

        return sim.run(on_round)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['name']}: {summary['algorithm']} on {summary['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, acc in enumerate(summary.get("acc_exit") or []):
        table.add_row(f"exit {k + 1} accuracy", f"{100 * acc:.2f}%  ({summary['exit_macs'][k]:,} MACs)")
    if summary.get("acc_avg_exit") is not None:
        table.add_row("average exit accuracy", f"{100 * summary['acc_avg_exit']:.2f}%")
        table.add_row("worst-client accuracy", f"{100 * summary['acc_worst_client']:.2f}%")
    table.add_row("bytes down / up", f"{summary['cum_bytes_down'] / 1e6:.2f} MB / {summary['cum_bytes_up'] / 1e6:.2f} MB")
    table.add_row("virtual time", f"{summary['virtual_time_s']:.1f} s")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("failed / late client-rounds", f"{summary['failed_total']} / {summary['dropped_late_total']}")
    console.print(table)


def wait_for(pred, timeout: float = 60.0, interval: float = 0.2) -> bool:  # noqa: ANN001
    """Poll ``pred`` until true or timeout (used by tests and benchmarks)."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(interval)
    return False
