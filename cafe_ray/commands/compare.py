"""`cafe-ray compare STUDY.yaml`: run a methods x settings study, write table and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        study: Annotated[Path, typer.Argument(help="Study YAML (base config, grid, variants).")],
        out: Annotated[Path, typer.Option("--out", help="Output folder (runs, table, plots).")] = Path("results"),
        only: Annotated[list[str] | None, typer.Option("--only", help="Run only these variant labels.")] = None,
        setting: Annotated[list[str] | None, typer.Option(
            "--setting", help="Run only these settings (names as in the table, e.g. 'fleet=full20,alpha=0.1').")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Ray cluster address.")] = None,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", "-s", help="Override a field of every run's base config: a.b=value (repeatable), "
                                "e.g. executor=sequential.")] = None,
        jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Simulations at once, each its own "
                                          "process (with --set executor=sequential: one core each).")] = 1,
        trust_pickles: Annotated[bool, typer.Option(
            "--trust-pickles", help="Resume interrupted tuning sweeps whose Ray Tune state this installation "
                                    "did not sign (unpickling runs any code it holds: only folders you trust).")] = False,
    ) -> None:
        """Run every (setting, variant, seed) not yet done; write results.md/.parquet and PNG plots.

        Cells are mean +- std over the study's seeds on the test split; tuning and the
        reference method read the validation split (data.val_fraction).
        """
        from cafe_ray.config import ConfigError
        from cafe_ray.studies.compare import markdown_table, run_study

        console = Console()
        try:
            rows = run_study(study, out, only=only, only_settings=setting, address=address, console=console,
                             jobs=jobs, overrides=set_, trust_pickles=trust_pickles)
        except ConfigError as err:
            Console(stderr=True).print(f"[red]error:[/] {err}")
            raise typer.Exit(2) from None
        console.print(markdown_table(rows))
        console.print(f"table: {out / 'results.md'}  plots: {out}/comparison_*.png")
