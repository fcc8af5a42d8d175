"""Serving configuration: one typed, frozen model; the CLI and tests only build it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SloCurve = Literal["pooled", "client"]  # the latency-SLO thresholds (cafe_ray.serve.slo)


class ServeConfig(BaseModel):
    """How ``cafe-ray serve`` runs a finished run's personal models."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    run_dir: str  # a directory written by `cafe-ray simulate` (made absolute: replicas run elsewhere)
    host: str = "127.0.0.1"  # HTTP bind address; 0.0.0.0 only when asked for
    port: int = Field(8000, ge=1, le=65535)  # HTTP port of the Serve proxy
    replicas: int = Field(1, ge=1)  # replicas of the one deployment; each multiplexes the clients
    replica_cpus: float = Field(1.0, ge=0)  # Ray CPUs reserved per replica (0: share with everything)
    threads: int = Field(1, ge=1)  # torch intra-op threads per replica
    max_batch: int = Field(256, ge=1)  # most samples in one predict request (more: HTTP 413)
    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # request body limit, checked before parsing (HTTP 413)
    batch_max_requests: int = Field(16, ge=1)  # serve.batch: requests merged into one model call
    batch_wait_ms: float = Field(2.0, ge=0)  # serve.batch: wait this long for a batch to fill
    batch_max_samples: int = Field(128, ge=1)  # most samples of one client model merged into one forward pass
    max_models_per_replica: int = Field(8, ge=1)  # serve.multiplexed LRU: client models kept per replica
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; raised to batch_max_requests if lower
    default_policy: str = "threshold"  # policy of a request that names none
    default_threshold: float = Field(0.6, ge=0, le=1)  # threshold of a threshold request that gives none
    default_max_entropy: float = Field(0.5, ge=0)  # max entropy (nats) of an entropy request that gives none
    latency_slo_ms: float | None = Field(None, gt=0)  # p99 target of requests that name no policy (SLO control)
    max_accuracy_drop: float = Field(1.0, ge=0, le=100)  # SLO floor: points of val accuracy below full depth
    slo_curve: SloCurve = "pooled"  # SLO thresholds: one ladder from all clients' val, or
    #                                                    each client's own val front
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests; None: `replicas`
    target_ongoing_requests: float = Field(2.0, gt=0)  # autoscaling: ongoing requests per replica to aim for
    learned: str | None = None  # learned policy: NAME.safetensors, a folder with policy.*, or a
    #                             `policy train --per-client` folder (client_<ID>/policy.*)
    access_log: bool = True  # Serve's per-request access log lines (replica; proxy when Serve starts here)
    app_name: str = "cafe-ray"  # Serve application name
    route_prefix: str = "/"  # HTTP route prefix of the application

    @field_validator("run_dir", "learned")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser().resolve())

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v

    @field_validator("autoscale")
    @classmethod
    def _autoscale(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1] or v is not None and v[1] < 1:
            raise ValueError(f"autoscale is MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {v[0]}:{v[1]}")
        return v

    @model_validator(mode="after")
    def _ongoing(self) -> ServeConfig:
        if self.max_ongoing_requests < self.batch_max_requests:
            object.__setattr__(self, "max_ongoing_requests", self.batch_max_requests)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


def server_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The URL a client uses for a server bound on ``host`` (a wildcard bind is reached on loopback)."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    reach = f"[{reach}]" if ":" in reach else reach
    return f"http://{reach}:{port}{route_prefix.rstrip('/')}"
