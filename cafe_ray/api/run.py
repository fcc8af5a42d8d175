"""A run directory as a Python object: what a notebook reads after (or instead of) a run.

Everything is read from the files ``cafe-ray simulate`` writes, on first use, so a
:class:`Run` of a directory made by the CLI, by :func:`cafe_ray.simulate` or copied
from another machine reads the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cafe_ray.config import ExperimentConfig, load_saved_config
from cafe_ray.runs import rundir

if TYPE_CHECKING:
    import pandas as pd

    from cafe_ray.models import EarlyExitNet
    from cafe_ray.runs.artifacts import RunArtifacts


class Run:
    """One run directory: ``config``, ``summary``, ``metrics`` and ``clients`` (pandas
    DataFrames), each client's personal early-exit ``model(i)``, and ``resume()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not rundir.is_run_dir(self.path):
            raise FileNotFoundError(f"{self.path} is not a run directory (no {rundir.CONFIG}); pass a "
                                    "directory written by `cafe-ray simulate` or cafe_ray.simulate")

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Any run directory, finished or not."""
        return cls(path)

    def __repr__(self) -> str:
        acc = self.summary.get("acc_avg_exit")
        what = f"acc_avg_exit={acc:.4f}" if acc is not None else "not finished"
        return f"Run({str(self.path)!r}, {what})"

    @cached_property
    def config(self) -> ExperimentConfig:
        return load_saved_config(self.path / rundir.CONFIG)

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json``; empty while the run has not finished."""
        return rundir.read_summary(self.path) if rundir.is_finished(self.path) else {}

    @property
    def finished(self) -> bool:
        return rundir.is_finished(self.path)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per round (``metrics.parquet``; the JSON lines while a run is unfinished)."""
        return self._table("metrics.parquet", rundir.METRICS)

    @property
    def clients(self) -> pd.DataFrame:
        """One row per client and round it took part in (``clients.parquet``, else the JSON lines)."""
        return self._table("clients.parquet", rundir.CLIENTS)

    @property
    def data_stats(self) -> dict[str, Any] | None:
        """What the data loader measured on the training split (tables: standardisation), if any."""
        import json

        path = self.path / rundir.DATA_STATS
        return json.loads(path.read_text()) if path.is_file() else None

    def _table(self, parquet: str, jsonl: str) -> pd.DataFrame:
        import pandas as pd

        path = self.path / parquet
        if path.is_file() and rundir.is_finished(self.path):
            return pd.read_parquet(path)
        return pd.DataFrame(rundir.read_jsonl(self.path / jsonl))

    @cached_property
    def artifacts(self) -> RunArtifacts:
        """The trained state (latest checkpoint); loaded once, on first use."""
        from cafe_ray.runs.artifacts import RunArtifacts

        return RunArtifacts(self.path)

    def model(self, client_id: int) -> EarlyExitNet:
        """Client ``client_id``'s personal early-exit model with its inference weights (eval mode)."""
        return self.artifacts.client_model(client_id)

    def resume(self, address: str | None = None, show_progress: bool = True,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> Run:
        """Continue the run from its last checkpoint to its last round (as ``--resume``);
        ``on_round`` as in :func:`cafe_ray.simulate`."""
        from cafe_ray.sim.engine import run_simulation

        run_simulation(None, resume_dir=self.path, address=address, show_progress=show_progress,
                       on_round=on_round)
        self.__dict__.pop("artifacts", None)  # a newer checkpoint now
        return self

