"""The run directory's format, written and read only here.

``runs/<name>-<timestamp>/``
  config.yaml          the resolved config (what `--resume` reads back)
  metrics.jsonl        one record per round (appended as rounds finish)
  metrics.parquet      the same as a table (rewritten at checkpoints and the end)
  clients.jsonl        one record per client per round: status, virtual time, bytes
  eval.jsonl           per client per-exit test accuracy at each evaluation
  splits.npz           each client's train/test indices (no pickle)
  profiles.json        each client's device profile
  store/               client personal states (safetensors)
  checkpoints/round_NNNNNN/  server.safetensors, state.json, store/ (hard links)
  summary.json         final metrics
  accuracy.png         per-exit accuracy over rounds
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cafe_ray.config import ExperimentConfig, dump_config
from cafe_ray.data.base import ClientSplit

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CLIENTS = "clients.jsonl"
EVAL = "eval.jsonl"
SUMMARY = "summary.json"
PROFILES = "profiles.json"
SPLITS = "splits.npz"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_SERVER = "server.safetensors"
ROUND_LOGS = (METRICS, CLIENTS, EVAL)


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    path.mkdir(parents=True)
    (path / CONFIG).write_text(dump_config(cfg))
    return path


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it is intact
    return out


def truncate_jsonl(path: Path, max_round: int) -> None:
    """Keep records of rounds <= max_round (resume drops what the checkpoint lacks)."""
    keep = [r for r in read_jsonl(path) if r.get("round", -1) <= max_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    """Flatten list-valued fields into numbered columns (acc_exit -> acc_exit_1..m)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        return
    rows = []
    for r in records:
        row = {}
        for k, v in r.items():
            if isinstance(v, list):
                for i, x in enumerate(v):
                    row[f"{k}_{i + 1}"] = x
            elif isinstance(v, dict):
                row[k] = json.dumps(v)
            else:
                row[k] = v
        rows.append(row)
    cols = sorted({k for row in rows for k in row}, key=lambda k: (k != "round", k))
    table = pa.table({c: [row.get(c) for row in rows] for c in cols})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def save_splits(path: Path, splits: list[ClientSplit]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for s in splits:
        arrays[f"train_{s.client_id}"] = s.train_idx
        arrays[f"test_{s.client_id}"] = s.test_idx
    np.savez_compressed(path, **arrays)


def load_splits(path: Path) -> list[ClientSplit]:
    with np.load(path, allow_pickle=False) as z:
        ids = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("train_"))
        return [ClientSplit(i, z[f"train_{i}"], z[f"test_{i}"]) for i in ids]


def plot_accuracy(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("acc_exit")]
    if not evals:
        return
    rounds = [r["round"] + 1 for r in evals]
    m = len(evals[0]["acc_exit"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k in range(m):
        ax.plot(rounds, [100 * r["acc_exit"][k] for r in evals], marker="o", ms=3, label=f"exit {k + 1}")
    ax.plot(rounds, [100 * r["acc_avg_exit"] for r in evals], "k--", lw=2, label="mean over exits")
    ax.plot(rounds, [100 * r["acc_worst_client"] for r in evals], ":", color="grey", label="worst client")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    ckpts = sorted(p for p in ckpt_root.glob("round_*") if p.is_dir())
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("round_*") if (p / CHECKPOINT_STATE).exists())
    return ckpts[-1] if ckpts else None


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Atomic JSON write: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=_json_default))
    os.replace(tmp, path)


def write_profiles(run_dir: Path, profiles: dict[str, dict[str, Any]]) -> None:
    write_json(run_dir / PROFILES, profiles)


def read_profiles(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in json.loads((run_dir / PROFILES).read_text()).items()}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(run_dir / SUMMARY, summary, indent=2)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The final metrics, or {} while the run has not finished."""
    p = run_dir / SUMMARY
    return json.loads(p.read_text()) if p.exists() else {}


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).exists()


def write_checkpoint_files(folder: Path, tensors: dict[str, Any], state: dict[str, Any]) -> None:
    """The server half of a checkpoint (the caller snapshots the client store beside it)."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / CHECKPOINT_SERVER))
    write_json(folder / CHECKPOINT_STATE, state)


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(server tensors, state dict) of one checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    return load_file(str(folder / CHECKPOINT_SERVER)), state


def last_eval(run_dir: Path) -> dict[int, list[float]]:
    """Each client's per-exit test accuracy at the run's last evaluation."""
    recs = read_jsonl(run_dir / EVAL)
    if not recs:
        return {}
    last = max(r["round"] for r in recs)
    return {r["client"]: r["acc_exit"] for r in recs if r["round"] == last}
