"""Tiny simulation configs the sim tests build on: digits, a few clients, a small CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cafe_ray.config import ExperimentConfig, apply_overrides, build_config


def tiny_cfg(tmp_path: Path, *sets: str, **top: Any) -> ExperimentConfig:
    raw: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "num_clients": 6, "partition": {"kind": "dirichlet", "alpha": 1.0, "min_size": 20}},
        "model": {"name": "cnn_small", "width": 8},
        "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "round": {"num_rounds": 4, "fraction": 0.5, "eval_every": 2},
        "profiles": {"catalog": "uniform", "actors_per_class": 2},
        "checkpoint": {"every": 2, "keep": 2},
    }
    raw.update(top)
    return build_config(apply_overrides(raw, list(sets)))


METRIC_KEYS = ("round", "participants", "completed", "failed", "dropped_late", "train_loss",
               "round_virtual_s", "virtual_time_s", "bytes_down", "bytes_up", "acc_exit", "acc_avg_exit",
               "acc_worst_client")


def comparable(records: list[dict]) -> list[dict]:
    """Metrics minus wall-clock fields: what must be identical across executions."""
    return [{k: r.get(k) for k in METRIC_KEYS} for r in records]
