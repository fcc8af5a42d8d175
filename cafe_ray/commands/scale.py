"""`cafe-ray sweep` (Ray Tune, ASHA on rounds) and `cafe-ray centralized` (Ray Train upper bound)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: a.b=value (repeatable).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: local; "
                                                "'auto' on a cluster node).")]


def _fail(msg: str) -> None:
    """One ``error:`` line, never wrapped and never read as markup, and exit 2."""
    err_console.print(Text.assemble(("error:", "red"), " ", msg), soft_wrap=True)
    raise typer.Exit(2)


def _warn_trusted(out: Path) -> None:
    """What --trust-pickles is about to unpickle, file by file, and whose key signed each."""
    from cafe_ray.studies.signing import trust_report

    lines = trust_report(out.resolve())
    err_console.print(f"[yellow]warning:[/] --trust-pickles: Ray Tune will unpickle these {len(lines)} files as "
                      "they are; unpickling runs any code they hold, so do this only for a folder you trust. "
                      "The resumed sweep re-signs them as this installation's.", soft_wrap=True)
    for line in lines:
        err_console.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Annotated[Path, typer.Argument(help="Base YAML config of every trial.")],
        space: Annotated[Path, typer.Option("--space", help="Search space YAML: dotted config keys -> "
                                            "{grid|choice|uniform|loguniform|randint: ...}.")],
        samples: Annotated[int, typer.Option("--samples", help="Tune num_samples (a grid runs this many "
                                             "times).")] = 1,
        out: Annotated[Path, typer.Option("--out", help="Output folder (table, best config, runs, Tune "
                                          "experiment).")] = Path("sweeps/sweep"),
        resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted sweep in --out.")] = False,
        set_: SetOpt = None,
        grace: Annotated[int | None, typer.Option("--grace-period", help="ASHA: rounds before a trial may be "
                                                  "stopped (default: round.eval_every).")] = None,
        reduction: Annotated[float, typer.Option("--reduction-factor", help="ASHA reduction factor.")] = 2.0,
        concurrent: Annotated[int | None, typer.Option("--max-concurrent", help="At most this many trials at "
                                                       "once (default: as many as fit).")] = None,
        coordinator_cpus: Annotated[float, typer.Option("--coordinator-cpus", help="CPUs reserved for each "
                                                        "trial's round loop (bundle 0).")] = 0.0,
        address: AddressOpt = None,
        trust_pickles: Annotated[bool, typer.Option("--trust-pickles", help="With --resume: load Ray Tune's "
                                                    "pickled state even if this installation did not sign it "
                                                    "(it can run code: only for folders you trust).")] = False,
    ) -> None:
        """Ray Tune sweep over config fields; ASHA early stopping on rounds; table + best config."""
        from cafe_ray.config import ConfigError, load_config
        from cafe_ray.sim.engine import ensure_ray
        from cafe_ray.studies.sweep import check_sweep, load_space, markdown_table, run_sweep

        try:  # all of it before Ray starts: a bad value or a --resume mismatch fails in seconds
            raw = load_config(config, set_ or []).model_dump(mode="json")
            sp = load_space(space)
            check_sweep(raw, sp, out, samples=samples, resume=resume, grace_period=grace,
                        reduction_factor=reduction, coordinator_cpus=coordinator_cpus, trust_pickles=trust_pickles)
            if resume and trust_pickles:
                _warn_trusted(out)
            ensure_ray(address)
        except ConfigError as err:
            _fail(str(err))
        try:
            with warnings.catch_warnings():  # said above, once
                warnings.filterwarnings("ignore", message="--trust-pickles")
                res = run_sweep(raw, sp, out, samples=samples, resume=resume, grace_period=grace,
                                reduction_factor=reduction, max_concurrent_trials=concurrent,
                                coordinator_cpus=coordinator_cpus, trust_pickles=trust_pickles)
        except (ConfigError, ValueError, FileNotFoundError) as err:
            _fail(str(err))
        console.print(markdown_table(res.rows, res.params))
        console.print(f"table: {res.paths['results_md']} (+ .csv, .parquet)")
        if res.best is not None:
            console.print(f"best config: [bold]{res.paths['best_config']}[/]")
        if res.interrupted:
            console.print(f"[yellow]interrupted:[/] continue with the same command plus --resume (out {out})")

    @app.command()
    def centralized(
        config: Annotated[Path, typer.Argument(help="YAML config (its data, model and train sections).")],
        set_: SetOpt = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs over the pooled data (default: "
                                                   "round.num_rounds * train.local_epochs).")] = None,
        workers: Annotated[int, typer.Option("--workers", help="Data-parallel Ray Train workers.")] = 2,
        gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: when the "
                                                 "cluster has one per worker).")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: a new run directory "
                                                 "under output_dir).")] = None,
        address: AddressOpt = None,
    ) -> None:
        """Centralized upper bound (Ray Train TorchTrainer): same model, pooled data, per-client eval."""
        from cafe_ray.config import ConfigError, load_config
        from cafe_ray.sim.engine import ensure_ray, print_summary
        from cafe_ray.studies.centralized import run_centralized

        try:
            cfg = load_config(config, set_ or [])
            ensure_ray(address)
        except ConfigError as err:
            _fail(str(err))
        try:
            run_dir, summary = run_centralized(cfg, epochs=epochs, workers=workers, use_gpu=gpu, out=out)
        except (ValueError, FileNotFoundError) as err:
            _fail(str(err))
        print_summary(summary, console)
        console.print(f"output: [bold]{run_dir}[/]")
