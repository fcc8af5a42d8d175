"""Direct ingress: each replica answers HTTP on its own port, without Serve's proxy hop.

Ray Serve (2.56+) has an experimental mode, switched on by the environment variable
``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, in which every replica of an ingress deployment also
runs its own HTTP server, on a port Serve allocates from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``
(30000) up, bound to the same host as the proxy. The proxy keeps working. On the request path
the proxy hop (a second process, an actor call and its serialization) was the cost that did
not shrink with the exits' MACs (docs/serving.md); going to a replica directly removes it.

Serve reads the variable once, when ``ray.serve`` is imported, and in every process of the
cluster; so :func:`enable_direct_ingress` must run before both (``cafe-ray serve
--direct-ingress`` starts its own local Ray after it). This module imports neither Ray nor
Ray Serve.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from cafe_ray.serve.config import server_url

ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"  # Serve's default range: 30000-31000
DEFAULT_MIN_PORT = 30000


def enable_direct_ingress() -> None:
    """Set the variable for this process and the local Ray it will start; refuse once too late."""
    if "ray.serve" in sys.modules and os.environ.get(ENV) != "1":
        raise RuntimeError(f"direct ingress must be enabled before Ray Serve is imported: set {ENV}=1 in the "
                           "environment of the command (and of every node of a cluster, before `ray start`)")
    os.environ[ENV] = "1"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def replica_urls(host: str, run_dir: str | Path, replicas: int, route_prefix: str = "/",
                 timeout_s: float = 60.0, span: int = 64) -> list[str]:
    """The URLs this run's replicas answer on directly, lowest port first.

    Serve allocates the ports from the bottom of its range, so the range's first ``span``
    ports are asked for ``/healthz`` (then ``{route_prefix}/healthz``) until ``replicas`` of
    them answer for this run (its directory name), or ``timeout_s`` passes (then what was
    found, possibly nothing).
    """
    low = int(os.environ.get(PORT_ENV, DEFAULT_MIN_PORT))
    name = Path(run_dir).name
    prefixes = [""] + ([route_prefix.rstrip("/")] if route_prefix.rstrip("/") else [])
    found: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for port in range(low, low + span):
            if port in found:
                continue
            for prefix in prefixes:
                base = server_url(host, port, prefix or "/")
                if _serves(base, name):
                    found[port] = base
                    break
        if len(found) >= replicas or time.monotonic() > deadline:
            return [found[p] for p in sorted(found)]
        time.sleep(0.5)


def _serves(base: str, run_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=0.5) as r:
            return r.status == 200 and json.loads(r.read()).get("run") == run_name
    except (OSError, ValueError):  # refused, timed out (URLError is an OSError), not JSON
        return False
