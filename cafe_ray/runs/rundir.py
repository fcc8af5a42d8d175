"""The run directory's format, written and read only here.

``runs/<name>-<timestamp>/``
  config.yaml          the resolved config (what `--resume` reads back)
  metrics.jsonl        one record per round (appended as rounds finish)
  metrics.parquet      the same as a table (rewritten at checkpoints and the end)
  clients.jsonl        one record per client per round: status, virtual time, bytes
  eval.jsonl           per client per-exit test accuracy at each evaluation
  splits.npz           every client's train/test/val indices as CSR arrays (no pickle; older runs: per-client keys)
  profiles.json        the device tiers once and each client's tier index (older runs: one entry per client)
  store/               client personal states (safetensors)
  checkpoints/round_NNNNNN/  server.safetensors, state.json, store/ (hard links)
  summary.json         final metrics
  warnings.jsonl       warnings raised by the driver, the coordinator and the client actors
  failed.json          why the last attempt stopped and how to resume (removed on success)
  accuracy.png         per-exit accuracy over rounds
  exit_traces/round_NNNNNN/client_<id>_<split>.safetensors
                       cached per-sample exit logits of a client model (EarlyExit-v0 envs build from it)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cafe_ray.config import ExperimentConfig, dump_config
from cafe_ray.data.base import ClientSplit, ClientSplits

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CLIENTS = "clients.jsonl"
EVAL = "eval.jsonl"
SUMMARY = "summary.json"
PROFILES = "profiles.json"
DATA_STATS = "data_stats.json"  # what the loader measured on the training split (standardisation)
SPLITS = "splits.npz"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_SERVER = "server.safetensors"
ROUND_LOGS = (METRICS, CLIENTS, EVAL)
WARNINGS = "warnings.jsonl"
PROVENANCE = "provenance.json"  # which code made the run (cafe-ray version, git commit, library versions)
FAILED = "failed.json"


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    path.mkdir(parents=True)
    (path / CONFIG).write_text(dump_config(cfg))
    write_json(path / PROVENANCE, provenance(), indent=1)
    return path


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The code that makes a run: cafe-ray's version and, in a git checkout, its commit.

    A study reuses a finished run only when it was made by the same cafe-ray version
    (studies.compare.same_run); the commit says which code exactly, and whether the
    checkout had uncommitted changes.
    """
    import importlib.metadata as md
    import platform
    import subprocess

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    out: dict[str, Any] = {"cafe_ray": version("cafe-ray"), "python": platform.python_version(),
                           "torch": version("torch"), "numpy": version("numpy"), "ray": version("ray")}
    src = Path(__file__).resolve().parents[2]
    if (src / ".git").exists():
        try:
            git = ["git", "-C", str(src)]
            out["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                               timeout=5, check=True).stdout.strip()
            out["git_dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                                   capture_output=True, text=True, timeout=5).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def read_provenance(run_dir: Path) -> dict[str, Any] | None:
    """What :func:`provenance` recorded for a run; None for runs made before it was recorded."""
    p = Path(run_dir) / PROVENANCE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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


_CSR_KEYS = ("train_ptr", "train_idx", "test_ptr", "test_idx", "val_ptr", "val_idx")


def save_splits(path: Path, splits: Sequence[ClientSplit]) -> None:
    """splits.npz: six CSR arrays (any number of clients in one write); per-client keys for lists."""
    if isinstance(splits, ClientSplits):  # uncompressed: shuffled indices barely compress, and a
        np.savez(path, **{k: getattr(splits, k) for k in _CSR_KEYS})  # million clients took ~10 s
        return
    arrays: dict[str, np.ndarray] = {}
    for s in splits:
        arrays[f"train_{s.client_id}"] = s.train_idx
        arrays[f"test_{s.client_id}"] = s.test_idx
        if len(s.val_idx):
            arrays[f"val_{s.client_id}"] = s.val_idx
    np.savez_compressed(path, **arrays)


def load_splits(path: Path) -> Sequence[ClientSplit]:
    with np.load(path, allow_pickle=False) as z:
        if "train_ptr" in z.files:
            return ClientSplits(*(z[k] for k in _CSR_KEYS))
        ids = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("train_"))
        empty = np.empty(0, dtype=np.int64)
        return [ClientSplit(i, z[f"train_{i}"], z[f"test_{i}"],
                            z[f"val_{i}"] if f"val_{i}" in z.files else empty) for i in ids]


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


def write_data_stats(run_dir: Path, stats: dict[str, Any] | None) -> None:
    """The statistics the data loader applied (``data.name: parquet``: the training split's
    per-channel mean and std), so that the run's inputs can be rebuilt outside it."""
    if stats:
        write_json(run_dir / DATA_STATS, stats)


def read_profiles(run_dir: Path) -> dict[int, dict[str, Any]]:
    """client id -> profile fields; reads both the per-client and the tiers + client_tier layout."""
    raw = json.loads((run_dir / PROFILES).read_text())
    if "client_tier" in raw and "tiers" in raw:
        tiers = raw["tiers"]
        return {i: tiers[t] for i, t in enumerate(raw["client_tier"])}
    return {int(k): v for k, v in raw.items()}


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


# ------------------------------------------------------------- reliability
@contextlib.contextmanager
def atomic_checkpoint(ckpt_root: Path, round_: int) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes ``round_NNNNNN`` in one rename.

    A crash or a full disk part-way leaves the previous checkpoints untouched and
    no folder named ``round_*`` (resume only reads those), and the half-written
    temp folder is removed so that it does not keep the disk full.
    """
    final = ckpt_root / f"round_{round_:06d}"
    tmp = ckpt_root / f".tmp_round_{round_:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():  # durable before it is visible
            if f.is_file():
                _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_warning(run_dir: Path, source: str, message: str, category: str = "UserWarning") -> bool:
    """Append a warning to warnings.jsonl unless the same message is already there; True if new."""
    path = Path(run_dir) / WARNINGS
    if any(r.get("message") == message for r in read_jsonl(path)):
        return False
    line = json.dumps({"time": time.time(), "source": source, "category": category, "message": message})
    with path.open("a") as f:  # one short O_APPEND write: safe from several processes
        f.write(line + "\n")
    return True


def read_warnings(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / WARNINGS)


def capture_warnings(run_dir: Path, source: str, echo: bool = True) -> Callable[[], None]:
    """Route this process's ``warnings.warn`` into the run's warnings.jsonl; returns the undo.

    Installed in the coordinator and the client actors, whose stderr nobody sees;
    the driver follows the file and prints what arrives. ``echo`` also shows the
    warning the usual way (stderr).
    """
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        with contextlib.suppress(OSError):  # a full disk must not turn a warning into a crash
            record_warning(run_dir, source, str(message), category.__name__)
        if echo:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show

    def restore() -> None:
        warnings.showwarning = previous

    return restore


def has_progress(run_dir: Path) -> bool:
    """True once a round finished (a metrics record or a checkpoint exists)."""
    return bool(read_jsonl(Path(run_dir) / METRICS)) or latest_checkpoint(Path(run_dir)) is not None


def write_failure(run_dir: Path, info: dict[str, Any]) -> None:
    """Record why an attempt stopped (read back by ``--resume`` to explain where it continues)."""
    write_json(Path(run_dir) / FAILED, info, indent=2)


def read_failure(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / FAILED
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}


def clear_failure(run_dir: Path) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run directory this command created and that holds no finished round."""
    shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------ exit-output cache
EXIT_TRACES = "exit_traces"  # exit_traces/round_NNNNNN/client_<id>_<split>.safetensors


def exit_trace_path(run_dir: Path, round_: int, client_id: int, split: str) -> Path:
    """Where a client model's per-sample exit outputs on ``split`` are cached for checkpoint ``round_``
    (a resumed run that trains further writes a new round, so a stale cache is never read)."""
    return Path(run_dir) / EXIT_TRACES / f"round_{int(round_):06d}" / f"client_{int(client_id)}_{split}.safetensors"


def write_exit_trace(path: Path, logits: np.ndarray, labels: np.ndarray, exit_macs: np.ndarray) -> bool:
    """Cache one trace (logits (N, m, C) float32, labels (N,), cascade MACs (m,)) atomically.
    Returns False, writing nothing, where the run directory is read-only (the cache is optional)."""
    from safetensors.numpy import save_file

    tensors = {"logits": np.ascontiguousarray(logits, dtype=np.float32),
               "labels": np.ascontiguousarray(labels, dtype=np.int64),
               "exit_macs": np.ascontiguousarray(exit_macs, dtype=np.int64)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def read_exit_trace(path: Path) -> dict[str, np.ndarray] | None:
    """A cached trace (logits, labels, exit_macs), or None if absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except (OSError, ValueError, SafetensorError):  # a truncated or foreign file: recompute
        return None
    return t if {"logits", "labels", "exit_macs"} <= set(t) else None
