"""`cafe-ray` command line: it only builds configs and calls the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cafe_ray.config import ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulate personalized federated learning with early-exit networks on Ray.")
bench_app = typer.Typer(no_args_is_help=True, help="Performance benchmarks (print ratios).")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "quickstart.yaml"

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: a.b=value (repeatable).")]


_DEBUG = {"on": bool(os.environ.get("CAFE_RAY_DEBUG"))}


def _print_version(value: bool) -> None:
    if value:
        from cafe_ray import __version__

        console.print(f"cafe-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="On errors, also print the full traceback.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Simulate personalized federated learning with early-exit networks on Ray."""
    if debug:
        _DEBUG["on"] = True


def _fail(msg: str, code: int = 2, err: BaseException | None = None) -> None:
    """One ``error:`` line (never wrapped, no markup parsing) and exit ``code``; --debug adds the traceback."""
    if err is not None and _DEBUG["on"]:
        import traceback

        ctx = err.__context__  # Ray's wrapper, with the remote traceback, when the cause was unwrapped
        if ctx is not None and ctx is not err.__cause__:
            traceback.print_exception(ctx, file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
    err_console.print(Text.assemble(("error:", "red"), " ", msg), soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path | None, sets: list[str] | None):
    path = config
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            _fail(f"no CONFIG given and the default {DEFAULT_CONFIG} is missing")
        path = DEFAULT_CONFIG
    try:
        return load_config(path, sets or [])
    except ConfigError as err:
        _fail(str(err))


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Argument(help="YAML config (default: simulations/quickstart.yaml).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory.")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: local).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Run a federated simulation (or resume one) and write its run directory.

    Everything knowable without training is checked before the run starts: all of it before
    Ray starts except building the model, which runs while Ray starts. Ctrl-C or
    SIGTERM stops the run, shuts down the local Ray it started and prints the
    command that resumes it; exit codes: 2 error, 130 Ctrl-C, 143 SIGTERM.
    """
    import signal
    import threading

    from cafe_ray.sim.errors import RunInterrupted, RunStopped, describe, on_sigterm
    from cafe_ray.sim.preflight import preflight, resume_config

    cfg = None if resume else _load(config, set_)
    if resume and (config or set_):
        _fail("--resume continues a run with its saved config; drop CONFIG and --set")
    try:  # before Ray (and before importing it): a bad input fails in seconds
        run_cfg = cfg if resume is None else resume_config(resume)
        # the run reuses its data; the model (torch) is built in a thread while Ray starts
        report = preflight(run_cfg, address=address, run_dir=resume, keep_data=True, model_in_background=True)
    except (ConfigError, FileNotFoundError) as err:
        _fail(describe(err), 2, err)
    except KeyboardInterrupt as err:
        _fail("interrupted while checking the config; nothing was written", 130, err)
    from cafe_ray.sim import engine

    if run_cfg.executor == "ray":
        try:
            engine.ensure_ray(address, preload=True)  # workers import the engine as they boot
        except KeyboardInterrupt as err:
            engine.shutdown_ray_if_started()
            _fail("interrupted while starting Ray; nothing was written", 130, err)
        except ConfigError as err:  # an --address where nothing answers: says so itself
            _fail(str(err), 2, err)
        except Exception as err:  # noqa: BLE001 - a wrong address, a cluster that went away
            engine.shutdown_ray_if_started()
            _fail(f"--address {address or '(local)'}: cannot start or reach Ray ({describe(err)})", 2, err)

    if threading.current_thread() is threading.main_thread():  # after ray.init, which installs its own
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run_dir, _ = engine.run_simulation(cfg, resume_dir=resume, address=address, console=console,
                                           show_progress=not no_progress, checked=report)
    except RunStopped as err:
        code = 2
        if isinstance(err, RunInterrupted):
            code = 143 if "SIGTERM" in err.reason else 130
        _fail(str(err), code, err)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as err:
        _fail(describe(err), 2, err)
    except KeyboardInterrupt as err:  # before the run directory existed (e.g. while checking the data)
        _fail("interrupted before the run started; nothing was written", 130, err)
    finally:
        engine.shutdown_ray_if_started()
    console.print(f"run directory: [bold]{run_dir}[/]")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config to check.")],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config.")] = False,
) -> None:
    """Check a config as `simulate` would before starting Ray: keys, values, algorithm, catalog,
    the dataset and its partition, the model, output_dir and the resource classes."""
    cfg = _load(config, set_)
    from cafe_ray.sim.preflight import preflight

    try:
        report = preflight(cfg, create_output_dir=False)
    except ConfigError as err:
        _fail(str(err), 2, err)
    for w in report.warnings:
        err_console.print(Text.assemble(("warning:", "yellow"), " ", w), soft_wrap=True)
    if show:
        console.print(dump_config(cfg))
    console.print(f"[green]ok[/] {config}")


@app.command()
def partition(
    config: Annotated[Path | None, typer.Argument(help="YAML config (its data section is used).")] = None,
    set_: SetOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a clients x classes heatmap PNG.")] = None,
) -> None:
    """Show how the data is split over clients: sizes and label histograms."""
    from cafe_ray.data.report import partition_report

    cfg = _load(config, set_)
    try:
        partition_report(cfg, plot, console)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if plot:
        console.print(f"heatmap: {plot}")


@app.command()
def models() -> None:
    """List the early-exit model zoo with parameters and MACs per exit."""
    from cafe_ray.models import models_table

    table = Table(title="early-exit model zoo (MACs per sample, measured)")
    for col in ("model", "dataset", "input", "params", "backbone params", "MACs to exit 1..m"):
        table.add_column(col, no_wrap=col in ("model", "dataset"))
    for r in models_table():
        table.add_row(r["name"], r["dataset"], str(tuple(r["input_shape"])), f"{r['params']:,}",
                      f"{r['backbone_params']:,}", " / ".join(f"{m:,}" for m in r["exit_macs"]))
    console.print(table)


@app.command()
def algorithms() -> None:
    """List the registered FL algorithms."""
    from cafe_ray.algorithms import available as names
    from cafe_ray.algorithms import get_algorithm

    for n in names():
        cls = get_algorithm(n)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        vec = "yes" if cls.supports_vectorize() else "no"
        console.print(f"[bold]{n}[/]  {doc}  [dim](engine.vectorize: {vec})[/]")


@app.command()
def profiles(
    catalog: Annotated[str, typer.Argument(help="Catalog name or FedScale-style JSON trace.")] = "iot_mix",
) -> None:
    """Show a device catalog: tiers, proportions, speeds and Ray resource classes."""
    from cafe_ray.config import ProfilesConfig
    from cafe_ray.sim.profiles import resolve_catalog

    try:
        cat = resolve_catalog(ProfilesConfig(catalog=catalog))
    except ValueError as err:
        _fail(str(err))
    table = Table(title=f"{cat.name}: {cat.description}")
    for col in ("tier", "share", "class", "GFLOP/s", "down/up Mbit/s", "online p", "fail p", "max depth"):
        table.add_column(col)
    for p, frac in cat.tiers[:20]:
        table.add_row(p.name, f"{frac:.0%}", p.resource_class,
                      f"{p.flops / 1e9:g}" if p.sec_per_sample is None else f"{p.sec_per_sample * 1e3:g} ms/sample",
                      f"{p.downlink_mbps:g}/{p.uplink_mbps:g}", f"{p.availability:g}", f"{p.failure_prob:g}",
                      str(p.max_depth or "all"))
    console.print(table)
    for c in cat.classes:
        console.print(f"class [bold]{c.name}[/]: Ray options {json.dumps(c.ray_options())}")


def _bench_out(out: Path | None) -> str:
    import tempfile

    return str(out) if out else tempfile.mkdtemp(prefix="cafe-ray-bench-")


JsonOpt = Annotated[Path | None, typer.Option(
    "--json", help="Also write the rows, ratios included, as JSON Lines to this file (- = stdout, instead of the table).")]


@bench_app.command("overhead")
def bench_overhead(
    dataset: Annotated[str, typer.Option(help="fashion_mnist (compute-bound workload) or digits/synthetic.")] = "fashion_mnist",
    clients: Annotated[int, typer.Option(help="Clients per round (all participate).")] = 20,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 3,
    max_train: Annotated[int | None, typer.Option(help="Subsample the train set.")] = 20000,
    repeats: Annotated[int, typer.Option(help="Engine/floor pairs, alternated; min and median reported.")] = 3,
    only: Annotated[str | None, typer.Option(help="Run one workload: big, tiny or vectorized.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where the engine's run directories go.")] = None,
    parallel: Annotated[bool, typer.Option(help="Also time W bare loops at once, each on its share of the clients "
                                                "(what W busy cores of this machine deliver).")] = True,
    json_out: JsonOpt = None,
) -> None:
    """Engine vs a fair floor (bare loop, 1 thread, same training and evaluation) and floor / workers."""
    import statistics

    from cafe_ray.bench import overhead, rows
    from cafe_ray.sim.engine import ensure_ray

    ensure_ray(None)
    o = _bench_out(out)
    work = {
        "big": (f"{dataset}, {clients} clients/round, {rounds} rounds, 1 epoch",
                overhead.workload(dataset, clients, rounds, 1, None, 16, max_train, o)),
        "tiny": ("synthetic 8x8, 50 clients/round, 5 rounds, 1 local step",
                 overhead.workload("synthetic", 50, 5, 1, 1, 8, None, o)),
        "vectorized": ("the tiny workload with engine.vectorize (cohorts of 16) vs the unvectorized floor",
                       overhead.workload("synthetic", 50, 5, 1, 1, 8, None, o, vectorize="on")),
    }
    results = [overhead.measure(label, cfg, repeats, parallel=parallel)
               for k, (label, cfg) in work.items() if only in (None, k)]
    if rows.write_rows(rows.overhead_rows(results), json_out):
        return
    table = Table(title="engine vs floor (wall s; min / median of alternated runs; lower is better)")
    for col in ("workload", "client-rounds", "floor 1 thread", "ideal floor/W", "parallel floor", "engine rounds",
                "engine end-to-end", "engine/ideal", "steady/ideal", "steady/parallel", "ms/client-round above ideal",
                "floor/engine", "load avg", "max acc diff"):
        table.add_column(col)
    for r in results:
        par = (f"{min(r.parallel):.2f} / {statistics.median(r.parallel):.2f}", f"{r.steady_vs_parallel('min'):.2f}x / "
               f"{r.steady_vs_parallel('median'):.2f}x") if r.parallel else ("-", "-")
        table.add_row(
            r.label, str(r.client_rounds), f"{r.floor_min:.2f} / {r.floor_median:.2f}",
            f"{r.ideal_min:.2f} (W={r.workers})", par[0],
            f"{r.engine_rounds('min'):.2f} / {r.engine_rounds('median'):.2f}",
            f"{r.engine_e2e('min'):.2f} / {r.engine_e2e('median'):.2f}",
            f"{r.ratio('min'):.2f}x / {r.ratio('median'):.2f}x",
            f"{r.steady_ratio('min'):.2f}x / {r.steady_ratio('median'):.2f}x", par[1],
            f"{r.above_ideal_ms('min'):.1f} / {r.above_ideal_ms('median'):.1f}",
            f"{r.floor_min / r.engine_rounds('min'):.2f}x / {r.floor_median / r.engine_rounds('median'):.2f}x",
            " ".join(f"{x.load:.1f}" for pair in zip(r.engine, r.floor, strict=True) for x in pair),
            f"{r.max_acc_diff:.4f}")
    Console(width=max(console.width, 200)).print(table)  # wide: the numbers, not wrapped


@bench_app.command("cohort")
def bench_cohort(
    clients: Annotated[list[int] | None, typer.Option(help="Cohort sizes (clients in one round).")] = None,
    repeats: Annotated[int, typer.Option(help="Plain/cohort pairs, alternated.")] = 3,
    json_out: JsonOpt = None,
) -> None:
    """engine.vectorize's compute: one batched cohort vs the same clients one by one (1 thread, no Ray).

    FedAvg-EE unless the row names another algorithm."""
    import statistics

    from cafe_ray.bench import overhead, rows

    table = Table(title="vectorized cohort vs per-client training, one process, 1 thread")
    for col in ("workload", "clients", "per client s (min / median)", "cohort s (min / median)", "speed-up (min / median)",
                "max param diff", "load avg"):
        table.add_column(col)
    work = [("synthetic 8x8, 1 local step, w8", overhead.workload("synthetic", n, 1, 1, 1, 8, None, "/tmp"))
            for n in clients or [16, 50]]
    digits = overhead.workload("digits", 16, 1, 2, None, 8, None, "/tmp")
    work.append(("digits, 2 epochs (~10 steps), w8", digits))
    work.append(("digits, FedRoD-EE (own batched loss), w8",
                 digits.model_copy(update={"algorithm": digits.algorithm.model_copy(update={"name": "fedrod_ee"})})))
    work.append(("digits, 2 epochs, w32 (4x the channels)", overhead.workload("digits", 16, 1, 2, None, 32, None, "/tmp")))
    measured = [(label, cfg.data.num_clients, overhead.cohort_vs_plain(cfg, repeats)) for label, cfg in work]
    if rows.write_rows(rows.cohort_rows(measured), json_out):
        return
    for label, clients, res in measured:
        p = [r.plain_s for r in res]
        c = [r.cohort_s for r in res]
        table.add_row(label, str(clients), f"{min(p):.3f} / {statistics.median(p):.3f}", f"{min(c):.3f} / {statistics.median(c):.3f}",
                      f"{min(p) / min(c):.2f}x / {statistics.median(p) / statistics.median(c):.2f}x",
                      f"{max(r.max_param_diff for r in res):.1e}", " ".join(f"{r.load:.1f}" for r in res))
    Console(width=max(console.width, 200)).print(table)


@bench_app.command("scale")
def bench_scale(
    per_round: Annotated[int, typer.Option(help="Clients per round.")] = 100,
    rounds: Annotated[int, typer.Option(help="Rounds (round 0 and the last are not steady).")] = 8,
    big: Annotated[int, typer.Option(help="Registered clients of the large run.")] = 1_000_000,
    small: Annotated[int, typer.Option(help="Registered clients of the small run.")] = 1000,
    samples: Annotated[int, typer.Option(help="Synthetic training samples (the same in both runs).")] = 2_000_000,
    repeats: Annotated[int, typer.Option(help="Small/large pairs, alternated.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Where run directories go.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Steady round time and peak memory at 1,000 vs 1,000,000 registered clients, 100 per round."""
    import statistics

    from cafe_ray.bench import rows, scale
    from cafe_ray.sim.engine import ensure_ray

    ensure_ray(None)
    o = _bench_out(out)
    res = [scale.measure_scale(n, per_round, rounds, o, samples) for _ in range(repeats) for n in (small, big)]
    if rows.write_rows(rows.scale_rows(res, small, big), json_out):
        return
    table = Table(title="rounds vs registered clients (same data, same clients per round)")
    for col in ("registered", "per round", "setup s", "steady round s (median)", "rounds s",
                "steady CPU s/round (Ray processes, median)", "peak RSS MB", "load avg"):
        table.add_column(col)
    for r in res:
        cpu = "-" if r.steady_cpu_s is None else f"{r.steady_cpu_s:.3f}"
        table.add_row(f"{r.registered:,}", str(r.per_round), f"{r.setup_s:.1f}", f"{r.steady_round_s:.3f}",
                      " ".join(f"{w:.2f}" for w in r.round_times), cpu, f"{r.peak_rss_mb:.0f}", f"{r.load:.1f}")
    Console(width=max(console.width, 200)).print(table)  # wide: the numbers, not wrapped
    for label, key in (("steady round time", lambda r: r.steady_round_s),
                       ("steady CPU per round", lambda r: r.steady_cpu_s)):
        s = [key(r) for r in res if r.registered == small and key(r) is not None]
        b = [key(r) for r in res if r.registered == big and key(r) is not None]
        if s and b:
            console.print(f"{label} {big:,} / {small:,} registered: min {min(b) / min(s):.2f}x, "
                          f"median {statistics.median(b) / statistics.median(s):.2f}x")


@bench_app.command("startup")
def bench_startup(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (default: simulations/quickstart.yaml).")
                      ] = DEFAULT_CONFIG,
    repeats: Annotated[int, typer.Option(help="Runs.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Where run directories go.")] = None,
    compare_preload: Annotated[bool, typer.Option(help="Alternate runs with and without the workers' preload.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """From the command to the end of the first round (fresh interpreter each run), and beyond ray.init."""
    import statistics

    from cafe_ray.bench import rows, startup

    if not config.is_file():
        _fail(f"bench startup: no config file at {config}: pass an experiment YAML (e.g. simulations/quickstart.yaml)")
    o = _bench_out(out)
    modes = (True, False) if compare_preload else (True,)
    res = [startup.measure_startup(config, o, preload=p) for _ in range(repeats) for p in modes]
    if rows.write_rows(rows.startup_rows(res, str(config)), json_out):
        return
    table = Table(title=f"start-up: {config}, command to end of round 0 (s)")
    for col in ("run", "workers preload", "interpreter + import CLI", "config + preflight", "ray.init",
                "after ray.init to round 0 end", "total", "beyond ray.init", "load avg"):
        table.add_column(col)
    for i, r in enumerate(res):
        table.add_row(str(i + 1), "yes" if r.preload else "no", f"{r.import_s:.2f}", f"{r.preflight_s:.2f}",
                      f"{r.ray_init_s:.2f}", f"{r.to_first_round_s:.2f}", f"{r.total_s:.2f}",
                      f"{r.beyond_ray_init_s:.2f}", f"{r.load:.1f}")
    Console(width=max(console.width, 200)).print(table)  # wide: the numbers, not wrapped
    for p in modes:
        beyond = [r.beyond_ray_init_s for r in res if r.preload == p]
        total = [r.total_s for r in res if r.preload == p]
        console.print(f"{'with' if p else 'without'} preload: beyond ray.init min {min(beyond):.2f} s, median "
                      f"{statistics.median(beyond):.2f} s; total min {min(total):.2f} s, median {statistics.median(total):.2f} s")


@bench_app.command("startup-probe", hidden=True)
def bench_startup_probe(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    out: Annotated[Path, typer.Argument(help="Where the run directory goes.")],
    preload: Annotated[bool, typer.Option(help="The local Ray's workers preload the engine.")] = True,
) -> None:
    """One start-up measured in this fresh process; one JSON line (what `bench startup` reads)."""
    from cafe_ray.bench import startup

    print(json.dumps(startup.probe(str(config), str(out), preload=preload)), flush=True)


@bench_app.command("memory")
def bench_memory(
    per_round: Annotated[int, typer.Option(help="Clients per round.")] = 50,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Where run directories go.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Peak RSS (driver + actors) with 100 vs 1000 registered clients, same clients per round."""
    import ray

    from cafe_ray.bench import memory, rows
    from cafe_ray.sim.engine import ensure_ray

    ensure_ray(None)
    o = _bench_out(out)
    res = [memory.measure(n, per_round, rounds, o) for n in (100, 1000)]
    if rows.write_rows(rows.memory_rows(res), json_out):
        ray.shutdown()
        return
    table = Table(title="memory vs registered clients")
    for col in ("registered", "per round", "peak RSS MB", "client store MB"):
        table.add_column(col)
    for r in res:
        table.add_row(str(r.registered), str(r.per_round), f"{r.peak_rss_mb:.0f}", f"{r.store_mb:.1f}")
    Console(width=max(console.width, 200)).print(table)  # wide: the numbers, not wrapped
    console.print(f"peak RSS ratio 1000/100 registered: {res[1].peak_rss_mb / res[0].peak_rss_mb:.2f}x")
    ray.shutdown()


@bench_app.command("all")
def bench_all(json_dir: Annotated[Path | None, typer.Option(
        "--json", help="Also write each benchmark's rows as JSON Lines into this folder (<name>.jsonl).")] = None,
) -> None:
    """Every benchmark with its defaults."""
    def to(name: str) -> Path | None:
        return json_dir / f"{name}.jsonl" if json_dir else None

    bench_overhead(json_out=to("overhead"))
    bench_memory(json_out=to("memory"))
    bench_cohort(json_out=to("cohort"))
    bench_scale(json_out=to("scale"))
    bench_startup(json_out=to("startup"))


def _register_command_modules() -> None:
    import importlib
    import pkgutil

    import cafe_ray.commands as commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"cafe_ray.commands.{mod}").register(app)


_register_command_modules()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
