"""Driver side: start the coordinator actor, follow its progress, print the result.

The coordinator (a Ray actor, zero CPUs of its own) owns the round loop; the
driver only starts it and polls ``progress()``, so a laptop, a local multi-node
cluster and a cloud cluster differ only in the Ray address.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cafe_ray.config import ExperimentConfig
from cafe_ray.runs import rundir
from cafe_ray.sim.errors import (
    SIGNALS,
    RunFailed,
    RunInterrupted,
    RunStopped,
    Terminated,
    describe,
    one_line,
    unwrap,
)
from cafe_ray.sim.plan import RunPlan
from cafe_ray.sim.preflight import PreflightReport

if TYPE_CHECKING:  # imported where used: the driver of a Ray run never imports torch (start-up)
    from cafe_ray.sim.executor import RayExecutor, SequentialExecutor
    from cafe_ray.sim.simulation import Simulation


def _ray_factory(**kw: Any) -> RayExecutor:
    from cafe_ray.sim.executor import RayExecutor

    return RayExecutor(**kw)


def _sequential_factory(*, cfg, dataset, splits, store_root, classes, client_class) -> SequentialExecutor:
    from cafe_ray.sim.executor import SequentialExecutor

    return SequentialExecutor(cfg, dataset, splits, store_root, client_class)


class Coordinator:
    """Ray actor body: holds the Simulation; ``run`` and ``progress`` run concurrently.

    The Simulation is built in ``run``, not in ``__init__``: an error while loading
    the data or creating the pools then reaches the driver as the task's own
    exception (``RayTaskError.cause``), not as an opaque "actor died" error.
    Warnings raised here go to the run's warnings.jsonl, which the driver follows.
    ``plan``: the run as the driver resolved it, without its arrays; ``data_refs``:
    [dataset ref, splits ref] the driver put (what its preflight loaded and partitioned);
    without them the coordinator loads and partitions the data itself.
    """

    def __init__(self, plan: RunPlan, run_dir: str, resume: bool, data_refs: list | None = None) -> None:
        self.plan, self.cfg = plan, plan.cfg
        self.run_dir, self.resume = run_dir, resume
        self.data_refs = data_refs
        self.sim: Simulation | None = None
        rundir.capture_warnings(Path(run_dir), "coordinator")

    def run(self) -> dict[str, Any]:
        import ray
        import torch

        from cafe_ray.sim.simulation import Simulation

        # the coordinator (0 CPUs of its own) aggregates between rounds: one thread, so that
        # it never takes the CPUs of the client actors on a compute-bound workload
        torch.set_num_threads(1)
        refs, self.data_refs = self.data_refs, None
        factory = _ray_factory if refs is None else functools.partial(_ray_factory, data_refs=refs)
        data = None if refs is None else tuple(ray.get(refs))  # zero-copy views of the driver's put
        self.sim = Simulation(self.plan.with_data(data), self.run_dir, factory, resume=self.resume)
        del data
        from cafe_ray.sim.executor import freeze_heap

        freeze_heap()  # the round loop's garbage collections skip the coordinator's set-up
        return self.sim.run()

    def progress(self) -> dict[str, Any]:
        if self.sim is None:
            return {"round": 0, "total": self.cfg.round.num_rounds, "status": "starting"}
        return dict(self.sim.progress.__dict__)

    def _ray_executor(self) -> RayExecutor:
        from cafe_ray.sim.executor import RayExecutor

        executor = self.sim.executor if self.sim is not None else None
        if not isinstance(executor, RayExecutor):
            raise RuntimeError("client actors exist only once a run under executor=ray has started")
        return executor

    def actor_info(self) -> list[dict]:
        return self._ray_executor().actor_info()

    def client_actors(self) -> list:
        """Handles of the client actors (fault-injection tests kill one)."""
        return [a for pool in self._ray_executor().pools.values() for a in pool]


def run_here(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the round loop in *this* process with the executor ``cfg.executor`` names.

    For callers that already are a Ray worker with their own resources, e.g. a Ray
    Tune trial (cafe_ray.studies.sweep): the client actors become this process's children and
    land in its placement group. Returns the summary.
    """
    from cafe_ray.sim.simulation import Simulation

    factory = _sequential_factory if cfg.executor == "sequential" else _ray_factory
    return Simulation(cfg, run_dir, factory, resume=resume).run(on_round)


def prepare_run(cfg: ExperimentConfig | None, resume_dir: str | Path | None) -> tuple[ExperimentConfig, Path, bool]:
    """Resolve (config, run dir, resume?) from either a config or a run directory."""
    if resume_dir is not None:
        from cafe_ray.sim.preflight import resume_config

        return resume_config(resume_dir), Path(resume_dir), True
    if cfg is None:
        raise ValueError("pass a config or a run directory to resume")
    return cfg, rundir.new_run_dir(cfg), False


_LOCAL: dict[str, Any] = {}  # the local Ray this process started: session dir, watchdog

# ensure_ray(preload=True): what the worker processes of a local Ray started here import as they
# boot, before any work (Ray's preload_python_modules). The raylet starts one idle worker per
# CPU as soon as the driver connects, so the coordinator and the first client actors land on
# processes that imported torch and the engine while the driver was still setting up the run
# (0.5-0.6 s less to the end of round 0 on a quiet 2-core machine: docs/benchmarks.md). Only
# simulations ask for it: every worker of that cluster pays the import (Serve's too). The
# driver itself imports neither torch nor these (engine imports them lazily).
PRELOAD_MODULES: tuple[str, ...] = ("cafe_ray.sim.engine", "cafe_ray.sim.simulation", "cafe_ray.sim.executor")


def ensure_ray(address: str | None, preload: bool = False) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started a local one.

    ``preload``: a local Ray's workers import :data:`PRELOAD_MODULES` as they start.

    A local Ray gets a watchdog process (cafe_ray.sim.reaper) that removes every
    process of its session if this process dies without ``ray.shutdown()`` (kill -9):
    Ray's agents would otherwise outlive it. Exiting normally runs :func:`shutdown_ray`.
    """
    import atexit

    import ray

    if ray.is_initialized():
        return False
    if address:
        from cafe_ray.sim.reach import check_reachable

        check_reachable(address)  # seconds, where ray.init would retry for minutes
        ray.init(address=address, log_to_driver=False)
        return False
    system = {"preload_python_modules": list(PRELOAD_MODULES)} if preload and PRELOAD_MODULES else None
    ray.init(include_dashboard=False, log_to_driver=False, _system_config=system)
    from cafe_ray.sim import reaper

    if _LOCAL:  # an earlier local Ray was shut down by plain ray.shutdown(): sweep it now
        shutdown_ray(keep_ray=True)
    session = reaper.local_session_dir()
    if session:
        _LOCAL.update(session=session, watchdog=reaper.start_watchdog(session))
        atexit.register(shutdown_ray)  # runs before Ray's own atexit hook (LIFO)
    return True


def shutdown_ray_if_started() -> None:
    """Shut down the local Ray that :func:`ensure_ray` started in this process (else nothing)."""
    if _LOCAL:
        shutdown_ray()


def shutdown_ray(keep_ray: bool = False) -> None:
    """``ray.shutdown()``, then remove what is left of the local session this process started."""
    import ray

    if not keep_ray:
        ray.shutdown()
    session, watchdog = _LOCAL.pop("session", None), _LOCAL.pop("watchdog", None)
    if session:
        from cafe_ray.sim import reaper

        reaper.kill_session(session)
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()


def start(plan: RunPlan | ExperimentConfig, run_dir: Path, resume: bool, address: str | None = None):
    """Start the coordinator actor; returns (actor handle, run() future).

    The coordinator runs on the driver's node: it needs no CPU, so Ray could otherwise
    place it on any worker node, and losing that node (a reclaimed spot instance, an
    autoscaler scale-down) would end the whole run instead of failing a few clients.
    ``plan``: the resolved run (a bare config is resolved here). Its dataset and splits, when
    it holds them (preflight loaded them), are put in the object store once and handed to
    the coordinator by reference, so it does not load them again; the rest of the plan
    travels as the actor's argument.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ensure_ray(address)
    if not isinstance(plan, RunPlan):
        plan = RunPlan.resolve(plan)
    refs = [ray.put(plan.dataset), ray.put(plan.splits)] if plan.has_data else None
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4, "scheduling_strategy": here}
    env = plugin_runtime_env(plan.cfg)
    if env is not None:  # the client actors the coordinator creates inherit it
        options["runtime_env"] = env
    actor = ray.remote(Coordinator).options(**options).remote(
        plan.without_data(), str(run_dir.resolve()), resume, refs)  # refs in a list: passed, not resolved
    return actor, actor.run.remote()


def plugin_runtime_env(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """A Ray runtime_env that ships the plug-in modules ``cfg`` names by import path to every
    worker (``py_modules``), on this machine and on a cluster's nodes alike; None when there are
    none to ship. Modules installed in site-packages are left to the nodes' own installs.

    An actor's runtime_env takes URIs only (local paths are for ``ray.init``'s, and the caller
    may have connected already): each module is uploaded to the cluster here, with the
    function ``ray.init`` itself uses, and named by its ``gcs://`` URI."""
    import importlib.util
    import sysconfig

    from cafe_ray.config import plugin_modules, search_working_folder

    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    paths = []
    search_working_folder()
    for name in plugin_modules(cfg):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        origin = Path(spec.origin).resolve()
        path = origin.parent if spec.submodule_search_locations else origin
        if not any(path == d or d in path.parents for d in installed):
            paths.append(str(path))
    if not paths:
        return None
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    with tempfile.TemporaryDirectory(prefix="cafe-ray-plugins-") as scratch:
        return upload_py_modules_if_needed({"py_modules": paths}, include_gitignore=True, scratch_dir=scratch)


def run_simulation(
    cfg: ExperimentConfig | None = None,
    *,
    resume_dir: str | Path | None = None,
    address: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    checked: PreflightReport | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) one simulation to its last round; returns (run dir, summary).

    :func:`cafe_ray.sim.preflight.preflight` runs first, before Ray starts and before the
    run directory exists, unless the caller already ran it (``checked``). A run that stops raises :class:`RunFailed` (the
    original error is its ``__cause__``) or :class:`RunInterrupted`; both say where it
    stopped and the command that resumes it. ``on_round(record)`` is called in this process
    with each round's record of ``metrics.jsonl`` as it is written. A run that stops before its first round
    leaves no run directory behind.
    """
    console = console or Console()
    report = checked.finish() if checked is not None else None  # a model check still running
    from cafe_ray.sim.preflight import preflight, resume_config

    if report is None:
        report = (preflight(cfg, address=address, keep_data=True) if resume_dir is None
                  else preflight(resume_config(resume_dir), address=address, run_dir=resume_dir, keep_data=True))
    # the run as preflight resolved it (keep_data=True: with the data it loaded and partitioned);
    # the report lets go of the data so that this process does not hold it for the whole run
    if report.plan is None:
        report.plan = RunPlan.resolve(cfg if resume_dir is None else resume_config(resume_dir))
    plan = report.plan
    report.plan = plan.without_data()
    cfg, run_dir, resume = prepare_run(plan.cfg, resume_dir)
    console.print(f"[bold]cafe-ray[/] {cfg.algorithm.name} on {cfg.data.name}: "
                  f"{cfg.data.num_clients} clients, {cfg.round.num_rounds} rounds -> {run_dir}")
    shown: set[str] = set()
    for w in report.warnings:
        rundir.record_warning(run_dir, "preflight", w)
    if resume:
        _explain_resume(run_dir, cfg, console)
        rundir.clear_failure(run_dir)
    _show_warnings(run_dir, console, shown)
    actor = fut = None
    try:
        if cfg.executor == "sequential":
            from cafe_ray.sim.simulation import Simulation

            restore = rundir.capture_warnings(run_dir, "driver", echo=False)
            try:
                sim = Simulation(plan, run_dir, _sequential_factory, resume=resume)
                plan = plan.without_data()
                summary = _follow_local(sim, console, show_progress, shown, on_round)
            finally:
                restore()
        else:
            import ray

            from cafe_ray.sim import autoscale

            ensure_ray(address, preload=True)  # first ask the autoscaler for the pools' nodes, showing the wait here
            autoscale.scale_for(plan.classes, cfg.profiles.autoscale_timeout_s,
                                lambda msg: console.print(f"[yellow]{msg}[/]"))
            actor, fut = start(plan, run_dir, resume, address)
            plan = plan.without_data()  # in the object store now; the driver holds only the references
            summary = _follow(actor, fut, cfg, console, show_progress, run_dir, shown,
                              RoundFeed(run_dir, on_round, resume) if on_round is not None else None)
            ray.kill(actor)
    except BaseException as err:  # noqa: BLE001 - Ctrl-C and SIGTERM included: say where it stopped
        _stop_coordinator(actor, fut)
        raise _stopped(err, cfg, run_dir, created=not resume, address=address) from unwrap(err)
    _show_warnings(run_dir, console, shown)
    print_summary(summary, console)
    return run_dir, summary


def _stop_coordinator(actor, fut) -> None:
    """Kill the coordinator (its client actors die with it) and wait until it has stopped writing."""
    if actor is None:
        return
    try:
        import ray

        ray.kill(actor)
        ray.wait([fut], timeout=10)
    except Exception:  # noqa: BLE001 - Ray may be going down too (Ctrl-C reaches its processes)
        pass


def resume_command(run_dir: Path, address: str | None = None) -> str:
    cmd = f"cafe-ray simulate --resume {shlex.quote(str(Path(run_dir).resolve()))}"
    return f"{cmd} --address {shlex.quote(address)}" if address else cmd


def _stopped(err: BaseException, cfg: ExperimentConfig, run_dir: Path, *, created: bool,
             address: str | None) -> RunStopped:
    """Record why the run stopped; remove the run directory when no round had finished."""
    cause = unwrap(err)
    interrupted = isinstance(err, KeyboardInterrupt)
    if interrupted:
        sigterm = isinstance(err, Terminated) or SIGNALS["sigterm"]
        reason = "terminated (SIGTERM)" if sigterm else "interrupted (Ctrl-C)"
    else:
        reason = describe(cause, cfg)
    records = rundir.read_jsonl(run_dir / rundir.METRICS)
    done = max((r.get("round", -1) for r in records), default=-1) + 1
    ckpt = rundir.latest_checkpoint(run_dir)
    ckpt_rounds = int(ckpt.name.split("_")[1]) + 1 if ckpt is not None else 0
    cls = RunInterrupted if interrupted else RunFailed
    if created and not rundir.has_progress(run_dir):
        rundir.remove_run_dir(run_dir)
        return cls(reason, run_dir=None, rounds_done=0, total=cfg.round.num_rounds, checkpoint_rounds=0,
                   resume_cmd=None)
    cmd = resume_command(run_dir, address)
    with contextlib.suppress(OSError):  # the disk may be full: the message matters more than the file
        rundir.write_failure(run_dir, {
            "reason": reason, "error": f"{type(cause).__name__}: {one_line(cause)}"[:2000],
            "rounds_done": done, "checkpoint_rounds": ckpt_rounds, "total": cfg.round.num_rounds,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "resume": cmd,
        })
    return cls(reason, run_dir=run_dir, rounds_done=done, total=cfg.round.num_rounds,
               checkpoint_rounds=ckpt_rounds, resume_cmd=cmd)


def _explain_resume(run_dir: Path, cfg: ExperimentConfig, console: Console) -> None:
    """Say what ``--resume`` continues from, and why the last attempt stopped."""
    ckpt = rundir.latest_checkpoint(run_dir)
    failure = rundir.read_failure(run_dir)
    why = f"; the last attempt stopped: {failure['reason']}" if failure.get("reason") else ""
    if ckpt is None:
        console.print(f"resuming {run_dir}: no checkpoint yet, starting from round 1{why}")
    else:
        n = int(ckpt.name.split("_")[1]) + 1
        console.print(f"resuming {run_dir} from its checkpoint after round {n} of "
                      f"{cfg.round.num_rounds}{why}")


def _show_warnings(run_dir: Path, console: Console, shown: set[str]) -> None:
    """Print warnings recorded by any process of this run that were not printed yet."""
    try:
        records = rundir.read_warnings(run_dir)
    except OSError:
        return
    for r in records:
        msg = r.get("message", "")
        if msg and msg not in shown:
            shown.add(msg)
            src = r.get("source", "")
            console.print(Text.assemble(("warning", "yellow"), f" ({src}): {msg}"), soft_wrap=True)


def _bar(console: Console, total: int, show: bool) -> Progress:
    return Progress(
        TextColumn("round {task.completed}/{task.total}"), BarColumn(),
        TextColumn("acc {task.fields[acc]}"), TextColumn("virtual {task.fields[vt]}"),
        TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
        console=console, disable=not show, transient=False,
        refresh_per_second=2,  # progress moves per round: 10 redraws a second only cost CPU
    )


def _fields(p: dict[str, Any]) -> dict[str, Any]:
    acc = p.get("acc_avg_exit")
    return {"acc": f"{100 * acc:.1f}%" if acc is not None else "-",
            "vt": f"{p.get('virtual_time_s', 0.0):.0f}s", "failed": p.get("failed_total", 0)}


OnRound = Callable[[dict[str, Any]], None]


class RoundFeed:
    """Hands each new round's record of ``metrics.jsonl`` to a callback, once, in order.

    The coordinator writes the records; the driver follows the file, so a callback (a
    logger to MLflow or W&B, a notebook plot) runs in the caller's process whichever
    executor runs the rounds. Resuming starts after the checkpoint's round: the rounds
    after it are run, and reported, again.
    """

    def __init__(self, run_dir: Path, on_round: OnRound, resume: bool) -> None:
        self.run_dir, self.on_round = run_dir, on_round
        ckpt = rundir.latest_checkpoint(run_dir) if resume else None
        self.next_round = int(ckpt.name.split("_")[1]) + 1 if ckpt is not None else 0
        self._seen: tuple[int, int] | None = None  # (size, mtime) of the file last read

    def poll(self) -> None:
        path = self.run_dir / rundir.METRICS
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        if (st.st_size, st.st_mtime_ns) == self._seen:  # polled twice a second; rounds are rarer
            return
        self._seen = (st.st_size, st.st_mtime_ns)
        for rec in rundir.read_jsonl(path):
            if rec.get("round", -1) >= self.next_round:
                self.next_round = int(rec["round"]) + 1
                self.on_round(rec)


def _follow(actor, fut, cfg: ExperimentConfig, console: Console, show: bool,
            run_dir: Path | None = None, shown: set[str] | None = None,
            feed: RoundFeed | None = None) -> dict[str, Any]:
    import ray

    shown = set() if shown is None else shown
    with _bar(console, cfg.round.num_rounds, show) as bar:
        task = bar.add_task("sim", total=cfg.round.num_rounds, acc="-", vt="0s", failed=0)
        while True:
            done, _ = ray.wait([fut], timeout=0.5)
            try:
                p = ray.get(actor.progress.remote(), timeout=10)
                bar.update(task, completed=p["round"], **_fields(p))
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
            if run_dir is not None:
                _show_warnings(run_dir, console, shown)
            if done:
                summary = ray.get(fut)
            if feed is not None:
                feed.poll()
            if done:
                return summary


def _follow_local(sim: Simulation, console: Console, show: bool, shown: set[str] | None = None,
                  user_on_round: OnRound | None = None) -> dict[str, Any]:
    shown = set() if shown is None else shown
    with _bar(console, sim.cfg.round.num_rounds, show) as bar:
        task = bar.add_task("sim", total=sim.cfg.round.num_rounds, acc="-", vt="0s", failed=0)

        def on_round(rec: dict[str, Any]) -> None:
            bar.update(task, completed=sim.progress.round, **_fields(sim.progress.__dict__))
            _show_warnings(sim.run_dir, console, shown)
            if user_on_round is not None:
                user_on_round(rec)

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
    if summary.get("devices"):
        table.add_row("training devices", "; ".join(f"{c}: {', '.join(d)}" for c, d in summary["devices"].items()))
    if summary.get("vectorize"):  # engine.vectorize on/auto: what each class's actors did
        table.add_row("batched cohorts", "; ".join(f"{c}: {', '.join(n)}" for c, n in summary["vectorize"].items()))
    console.print(table)


def wait_for(pred, timeout: float = 60.0, interval: float = 0.2) -> bool:
    """Poll ``pred`` until true or timeout (used by tests and benchmarks)."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(interval)
    return False
