"""Show how a config splits its data over clients (``cafe-ray partition CONFIG --plot out.png``).

Non-IID settings are easy to get wrong silently (an alpha that is far more
skewed than intended, empty classes, tiny test splits); this prints the split
and optionally draws a clients x classes heatmap so it can be checked by eye.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from cafe_ray.config import ExperimentConfig
from cafe_ray.data.base import ArrayDataset, ClientSplit
from cafe_ray.data.datasets import load_dataset
from cafe_ray.data.partition import partition_clients

_BARS = " ▁▂▃▄▅▆▇█"


def label_counts(ds: ArrayDataset, splits: Sequence[ClientSplit], test: bool = False) -> np.ndarray:
    """int64 (clients, classes) matrix of label counts in each client's train (or test) split."""
    y = ds.y_test if test else ds.y_train
    k = max(ds.num_classes, int(ds.y_train.max()) + 1, int(ds.y_test.max()) + 1)
    return np.stack([np.bincount(y[s.test_idx if test else s.train_idx], minlength=k)[:k]
                     for s in splits])


def _spark(row: np.ndarray) -> str:
    top = row.max()
    if top == 0:
        return ""
    return "".join(_BARS[int(np.ceil(v / top * (len(_BARS) - 1)))] for v in row)


def _top(row: np.ndarray, names: tuple[str, ...], n: int = 3) -> str:
    idx = [int(i) for i in np.argsort(-row, kind="stable")[:n] if row[i] > 0]
    return " ".join(f"{names[i] if i < len(names) else i}:{row[i]}" for i in idx)


def _entropy(counts: np.ndarray) -> np.ndarray:
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def plot_heatmap(counts: np.ndarray, path: Path, title: str, classes: tuple[str, ...] = ()) -> None:
    """Clients x classes heatmap of train label counts, with a colorbar, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_clients, k = counts.shape
    fig = Figure(figsize=(min(4 + 0.25 * k, 16), min(2.5 + 0.2 * n_clients, 12)), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: does not touch the global backend
    ax = fig.add_subplot()
    im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="train samples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    if k <= 20:
        ax.set_xticks(range(k), [classes[i] if i < len(classes) else str(i) for i in range(k)],
                      rotation=45, ha="right", fontsize=8)
    if n_clients <= 40:
        ax.set_yticks(range(n_clients))
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def partition_report(cfg: ExperimentConfig, plot: Path | None, console: Console,
                     max_rows: int = 50) -> Sequence[ClientSplit]:
    """Load and partition ``cfg.data`` with ``cfg.seed``, print a per-client table, maybe plot."""
    ds = load_dataset(cfg.data, seed=cfg.seed)
    splits = partition_clients(ds, cfg.data, seed=cfg.seed)
    train, test = label_counts(ds, splits), label_counts(ds, splits, test=True)
    pc = cfg.data.partition
    how = {"iid": "iid", "dirichlet": f"dirichlet(alpha={pc.alpha}, min_size={pc.min_size})",
           "shards": f"shards(k={pc.shards_per_client})"}[pc.kind]
    title = f"{ds.name}: {len(splits)} clients, {how}, seed {cfg.seed}"
    table = Table(title=title, show_lines=False)
    columns: list[tuple[str, Literal["left", "right"]]] = [
        ("client", "right"), ("train", "right"), ("test", "right"), ("labels", "right"),
        ("train label histogram", "left"), ("top labels", "left")]
    for col, just in columns:
        table.add_column(col, justify=just)
    show_spark = train.shape[1] <= 64
    for s, row, trow in list(zip(splits, train, test, strict=True))[:max_rows]:
        table.add_row(str(s.client_id), str(len(s.train_idx)), str(trow.sum()),
                      str(int((row > 0).sum())), _spark(row) if show_spark else "",
                      _top(row, ds.classes))
    console.print(table)
    if len(splits) > max_rows:
        console.print(f"... {len(splits) - max_rows} more clients not shown")
    sizes = train.sum(axis=1)
    console.print(
        f"train sizes min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()} "
        f"(total {sizes.sum()} of {len(ds.y_train)}); mean label entropy "
        f"{_entropy(train).mean():.2f} nats (uniform = {np.log(train.shape[1]):.2f})")
    if plot is not None:
        plot_heatmap(train, Path(plot), title, ds.classes)
        console.print(f"heatmap written to {plot}")
    return splits
