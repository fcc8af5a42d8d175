"""Ray Serve application for a run's personalized early-exit models (`cafe-ray serve`).

:mod:`~cafe_ray.serve.core` is the pure request -> prediction core, :mod:`~cafe_ray.serve.service`
a replica's logic without Ray, :mod:`~cafe_ray.serve.app` the Serve deployment (imported lazily:
``start``/``build_app`` pull in Ray Serve and FastAPI).
"""

from __future__ import annotations

from typing import Any

from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.core import (
    BatchTooLarge,
    ClientMismatch,
    InvalidInput,
    InvalidPolicy,
    RequestError,
    UnknownClient,
)
from cafe_ray.serve.schemas import PredictRequest, PredictResponse
from cafe_ray.serve.service import ModelService

__all__ = [
    "BatchTooLarge", "ClientMismatch", "InvalidInput", "InvalidPolicy", "ModelService", "PredictRequest",
    "PredictResponse", "RequestError", "ServeConfig", "UnknownClient", "build_app", "start",
]


def start(cfg: ServeConfig, address: str | None = None) -> Any:
    """Start Ray/Serve and deploy (see :func:`cafe_ray.serve.app.start`); returns the handle."""
    from cafe_ray.serve.app import start as _start

    return _start(cfg, address)


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application, not started (see :func:`cafe_ray.serve.app.build_app`)."""
    from cafe_ray.serve.app import build_app as _build

    return _build(cfg)
