"""`cafe-ray` command line: it only builds configs and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cafe_ray.config import ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulate personalized federated learning with early-exit networks on Ray.")
bench_app = typer.Typer(no_args_is_help=True, help="Performance benchmarks (print ratios).")
app.add_typer(bench_app, name="bench")
console = Console()
err_console = Console(stderr=True)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "quickstart.yaml"

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: a.b=value (repeatable).")]


def _fail(msg: str) -> None:
    err_console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


def _load(config: Path | None, sets: list[str] | None):  # noqa: ANN202
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
    """Run a federated simulation (or resume one) and write its run directory."""
    from cafe_ray.sim.engine import run_simulation

    cfg = None if resume else _load(config, set_)
    if resume and (config or set_):
        _fail("--resume continues a run with its saved config; drop CONFIG and --set")
    try:
        run_dir, _ = run_simulation(cfg, resume_dir=resume, address=address, console=console,
                                    show_progress=not no_progress)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    console.print(f"run directory: [bold]{run_dir}[/]")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config to check.")],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config.")] = False,
) -> None:
    """Check a config file: unknown keys and bad values are reported with their path."""
    cfg = _load(config, set_)
    from cafe_ray.algorithms import available
    from cafe_ray.sim.profiles import resolve_catalog

    if cfg.algorithm.name not in available():
        _fail(f"algorithm.name: unknown algorithm {cfg.algorithm.name!r}; available: {', '.join(available())}")
    try:
        resolve_catalog(cfg.profiles)
    except ValueError as err:
        _fail(str(err))
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
        doc = (sys.modules[get_algorithm(n).__module__].__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{n}[/]  {doc}")


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


@bench_app.command("overhead")
def bench_overhead(
    dataset: Annotated[str, typer.Option(help="fashion_mnist (target workload) or digits/synthetic.")] = "fashion_mnist",
    clients: Annotated[int, typer.Option(help="Clients per round (all participate).")] = 20,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 3,
    max_train: Annotated[int | None, typer.Option(help="Subsample the train set.")] = 20000,
    out: Annotated[Path | None, typer.Option(help="Where the engine's run directories go.")] = None,
) -> None:
    """Engine vs a bare PyTorch loop on the same FedAvg-EE workload; and per client-round overhead."""
    from cafe_ray.bench import overhead
    from cafe_ray.sim.engine import ensure_ray

    ensure_ray(None)
    o = _bench_out(out)
    big = overhead.measure(f"{dataset}, {clients} clients/round, 1 epoch",
                           overhead.workload(dataset, clients, rounds, 1, None, 16, max_train, o))
    tiny = overhead.measure("synthetic 8x8, 50 clients/round, 1 local step",
                            overhead.workload("synthetic", 50, 5, 1, 1, 8, None, o))
    table = Table(title="engine overhead (wall time, lower is better)")
    for col in ("workload", "client-rounds", "bare loop s", "engine s", "engine/bare", "overhead ms/client-round"):
        table.add_column(col)
    for r in (big, tiny):
        table.add_row(r.label, str(r.client_rounds), f"{r.bare_s:.2f}", f"{r.engine_s:.2f}",
                      f"{r.ratio:.2f}x", f"{r.overhead_ms_per_client_round:.1f}")
    console.print(table)


@bench_app.command("memory")
def bench_memory(
    per_round: Annotated[int, typer.Option(help="Clients per round.")] = 50,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Where run directories go.")] = None,
) -> None:
    """Peak RSS (driver + actors) with 100 vs 1000 registered clients, same clients per round."""
    import ray

    from cafe_ray.bench import memory
    from cafe_ray.sim.engine import ensure_ray

    ensure_ray(None)
    o = _bench_out(out)
    res = [memory.measure(n, per_round, rounds, o) for n in (100, 1000)]
    table = Table(title="memory vs registered clients")
    for col in ("registered", "per round", "peak RSS MB", "client store MB"):
        table.add_column(col)
    for r in res:
        table.add_row(str(r.registered), str(r.per_round), f"{r.peak_rss_mb:.0f}", f"{r.store_mb:.1f}")
    console.print(table)
    console.print(f"peak RSS ratio 1000/100 registered: {res[1].peak_rss_mb / res[0].peak_rss_mb:.2f}x")
    ray.shutdown()


@bench_app.command("all")
def bench_all() -> None:
    """Every benchmark with its defaults."""
    bench_overhead()
    bench_memory()


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
