"""`cafe-ray interference RUN_DIR ...`: do the exits' gradients conflict on the shared stages?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command()
    def interference(
        runs: Annotated[list[Path], typer.Argument(help="Run directories made with "
                                                 "algorithm.cafedistill.measure_interference=true.")],
        phases: Annotated[int, typer.Option("--phases", min=1, help="Split training into this many phases.")] = 3,
        plot: Annotated[Path | None, typer.Option("--plot", help="Write the cosine-per-round plot here.")] = None,
    ) -> None:
        """Cosine between exit pairs' loss gradients on their shared stages, per phase of training."""
        from cafe_ray.studies.interference import markdown, summarise
        from cafe_ray.studies.interference import plot as draw

        try:
            rows = summarise(runs, phases)
        except (ValueError, OSError) as err:
            Console(stderr=True).print(f"[red]error:[/] {err}")
            raise typer.Exit(2) from None
        Console().print(markdown(rows))
        if plot is not None:
            Console().print(f"plot: {draw(runs, plot)}")
