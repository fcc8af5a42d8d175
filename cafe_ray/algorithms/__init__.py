"""FL algorithms: pure PyTorch + numpy, never Ray. Importing this registers the built-ins."""

from cafe_ray.algorithms import (  # noqa: F401  (registration)
    cafedistill,
    depthfl,
    ditto,
    fedamp,
    fedavg,
    fedbabu,
    fedpac,
    fedper,
    fedrep,
    fedrod,
    local,
    pfedgraph,
    scalefl,
)
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
