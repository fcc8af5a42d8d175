"""The run directory: ``rundir`` owns its file format (writing and reading);
``RunArtifacts`` reads a finished run back as each client's personal dynamic model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cafe_ray.runs.artifacts import RunArtifacts

__all__ = ["RunArtifacts"]


def __getattr__(name: str) -> Any:
    # Lazy: the simulation imports ``cafe_ray.runs.rundir`` and must not pull in models.
    if name == "RunArtifacts":
        from cafe_ray.runs.artifacts import RunArtifacts

        return RunArtifacts
    raise AttributeError(name)
