"""Early-exit networks: the base contract, the model zoo and measured per-exit MACs.

Names are loaded on first use: :mod:`cafe_ray.models.inputs` (which architecture fits which
inputs) stays importable without torch, for the checks that run before Ray starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cafe_ray.models.base import EarlyExitNet, LastExitHead
    from cafe_ray.models.inputs import MODEL_NAMES
    from cafe_ray.models.macs import ExitCost, exit_macs
    from cafe_ray.models.zoo import (
        build_model,
        cnn_small,
        conv3,
        make_model,
        models_table,
        resnet18_ee,
        transformer4,
    )

_HOME: dict[str, str] = {
    "EarlyExitNet": "base", "LastExitHead": "base", "MODEL_NAMES": "inputs", "ExitCost": "macs",
    "exit_macs": "macs", "build_model": "zoo", "cnn_small": "zoo", "conv3": "zoo", "make_model": "zoo",
    "models_table": "zoo", "resnet18_ee": "zoo", "transformer4": "zoo",
}

__all__ = [
    "MODEL_NAMES",
    "EarlyExitNet",
    "ExitCost",
    "LastExitHead",
    "build_model",
    "cnn_small",
    "conv3",
    "exit_macs",
    "make_model",
    "models_table",
    "resnet18_ee",
    "transformer4",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"cafe_ray.models.{_HOME[name]}"), name)
    raise AttributeError(f"module 'cafe_ray.models' has no attribute {name!r}")
