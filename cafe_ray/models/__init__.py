"""Early-exit networks: the base contract, the model zoo and measured per-exit MACs."""

from cafe_ray.models.base import EarlyExitNet, LastExitHead
from cafe_ray.models.macs import ExitCost, exit_macs
from cafe_ray.models.zoo import (
    MODEL_NAMES,
    build_model,
    cnn_small,
    conv3,
    models_table,
    resnet18_ee,
    transformer4,
)

__all__ = [
    "MODEL_NAMES",
    "EarlyExitNet",
    "ExitCost",
    "LastExitHead",
    "build_model",
    "cnn_small",
    "conv3",
    "exit_macs",
    "models_table",
    "resnet18_ee",
    "transformer4",
]
