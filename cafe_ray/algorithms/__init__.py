"""FL algorithms: pure PyTorch + numpy, never Ray. Importing this registers the built-ins."""

from cafe_ray.algorithms import cafedistill, fedavg, fedper, local  # noqa: F401  (registration)
from cafe_ray.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientOutput,
    ClientResult,
    Message,
    Params,
    RoundContext,
    ServerState,
    available,
    build_algorithm,
    get_algorithm,
    register,
)

__all__ = [
    "Algorithm",
    "ClientContext",
    "ClientData",
    "ClientOutput",
    "ClientResult",
    "Message",
    "Params",
    "RoundContext",
    "ServerState",
    "available",
    "build_algorithm",
    "get_algorithm",
    "register",
]
