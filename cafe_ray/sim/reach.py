"""Is anything listening at a Ray ``--address``? Asked before ``ray.init``.

``ray.init(address="HOST:PORT")`` where nothing listens retries its GCS connection for
many minutes and prints only Ray's own warnings. One TCP connect, with a timeout, tells
a wrong or dead address apart in seconds; what answers is then left to Ray.
"""

from __future__ import annotations

import os
import socket

from cafe_ray.config import ConfigError

GCS_PORT = 6379  # `ray start --head` default
CLIENT_PORT = 10001  # Ray Client (ray://) default


class UnreachableAddressError(ConfigError):
    """Nothing accepts a connection at a Ray cluster address."""


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) that ``address`` names; None for 'auto'/'local', which Ray resolves itself."""
    a = address.strip()
    if a in ("", "auto", "local"):
        return None
    default = GCS_PORT
    if a.startswith("ray://"):
        a, default = a[len("ray://"):], CLIENT_PORT
    elif "://" in a:
        a = a.split("://", 1)[1]
    a = a.split("/", 1)[0]
    if a.startswith("["):  # [IPv6]:port
        host, _, rest = a[1:].partition("]")
        port = rest.lstrip(":")
    elif a.count(":") == 1:
        host, port = a.split(":")
    else:
        host, port = a, ""
    if not host:
        raise UnreachableAddressError(f"--address {address!r}: no host; give HOST:PORT, e.g. 127.0.0.1:6379")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise UnreachableAddressError(f"--address {address!r}: the port {port!r} is not a number; "
                                      "give HOST:PORT, e.g. 127.0.0.1:6379") from None


def _hint(port: int) -> str:
    return (f"start one with `ray start --head --port {port}` and pass the address it prints, or find a running "
            "cluster's address with `ray status` on its head (on a node of that cluster, --address auto)")


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise :class:`UnreachableAddressError` (one line) when nothing accepts a TCP connection there.

    'auto' is checked when it resolves to an address (``RAY_ADDRESS``); otherwise Ray
    looks for a cluster on this machine itself and says so when there is none.
    """
    if address is None:
        return
    if address.strip() == "auto" and os.environ.get("RAY_ADDRESS", "").strip() not in ("", "auto"):
        address = os.environ["RAY_ADDRESS"]
    hp = split_address(address)
    if hp is None:
        return
    host, port = hp
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror as err:
        why = f"the host name does not resolve ({err.strerror or err})"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s (a firewall, or no such machine)"
    except ConnectionRefusedError:
        why = "connection refused: no Ray cluster listens on that port"
    except OSError as err:
        why = err.strerror or str(err)
    raise UnreachableAddressError(f"--address {address}: cannot reach a Ray cluster at {host}:{port} ({why}); "
                                  + _hint(port))
