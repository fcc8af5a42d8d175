"""partition_report prints a table and writes a heatmap PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cafe_ray.config import DataConfig, ExperimentConfig
from cafe_ray.data.report import partition_report


def test_report_table_and_png(tmp_path: Path) -> None:
    cfg = ExperimentConfig(seed=1, data=DataConfig(name="digits", num_clients=6))
    console = Console(record=True, width=140)
    out = tmp_path / "plots" / "heat.png"
    splits = partition_report(cfg, out, console)
    assert len(splits) == 6
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = console.export_text()
    assert "digits: 6 clients, dirichlet(alpha=0.3" in text
    assert "mean label entropy" in text


def test_report_without_plot_truncates_rows(tmp_path: Path) -> None:
    cfg = ExperimentConfig(data=DataConfig(name="synthetic", synthetic_samples=200, num_clients=12,
                                           partition={"kind": "iid"}))
    console = Console(record=True, width=140)
    splits = partition_report(cfg, None, console, max_rows=5)
    assert len(splits) == 12
    assert "7 more clients not shown" in console.export_text()
    assert not list(tmp_path.iterdir())
