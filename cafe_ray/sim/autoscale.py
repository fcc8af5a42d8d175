"""Asking the Ray autoscaler for the nodes a simulation's device classes need.

``ray.available_resources()`` only sees nodes that are up; on a cluster launched
with ``ray up`` (worker types with ``min_workers: 0``) a simulation would otherwise
shrink its pools to the head, or fail because no live node advertises a class's
custom resource. Before the pools are built, :func:`scale_for` asks the autoscaler
for one bundle per client actor (``ray.autoscaler.sdk.request_resources``) and
waits, reporting progress, until the cluster can host every pool or
``profiles.autoscale_timeout_s`` has passed; the executor then shrinks what still
does not fit (``profiles.check_fits``) and says so. The request stands for the whole
run, so nodes that join later let the pools grow (:func:`grow_plan`), and is
withdrawn by :func:`release` when the run ends, after which idle nodes go away
after the cluster's ``idle_timeout_minutes``.

A request replaces any earlier one on the cluster (Ray keeps one standing request),
so two simulations sharing one cluster should not rely on it; sweeps do not use it
at all: their trials' placement groups are demand the autoscaler already sees.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cafe_ray.sim.profiles import ResourceClass, check_fits

Report = Callable[[str], None]


def actor_bundle(c: ResourceClass) -> dict[str, float]:
    """The Ray resources of one client actor of class ``c`` (zeros left out)."""
    b = {"CPU": c.num_cpus, "GPU": c.num_gpus, "memory": float(c.memory or 0), **c.resources}
    return {k: float(v) for k, v in b.items() if v}


def demand_bundles(classes: Sequence[ResourceClass]) -> list[dict[str, float]]:
    """One bundle per wanted client actor: what ``request_resources`` is asked for."""
    out: list[dict[str, float]] = []
    for c in classes:
        b = actor_bundle(c)
        if b:
            out.extend(dict(b) for _ in range(c.actors or 1))
    return out


def fits_fully(classes: Sequence[ResourceClass], available: dict[str, float]) -> bool:
    """True when every pool fits at its full size (``check_fits`` would not shrink it)."""
    try:
        fitted = check_fits(classes, available)
    except ValueError:
        return False
    return all((f.actors or 1) == (c.actors or 1) for f, c in zip(fitted, classes, strict=True))


def shortfall(classes: Sequence[ResourceClass], available: dict[str, float]) -> dict[str, float]:
    """Resource -> how much more the full pools need than ``available`` has."""
    need: dict[str, float] = {}
    for b in demand_bundles(classes):
        for r, v in b.items():
            need[r] = need.get(r, 0.0) + v
    return {r: v - available.get(r, 0.0) for r, v in need.items() if v > available.get(r, 0.0) + 1e-9}


@dataclass(frozen=True)
class AutoscalerState:
    """What the cluster's autoscaler reports (``ray status`` reads the same record)."""

    present: bool  # an autoscaler that can launch nodes manages this cluster
    pending_launches: dict[str, int]  # node type -> count being launched
    failed_nodes: int


def autoscaler_state(wait_s: float = 10.0) -> AutoscalerState:
    """Read the autoscaler's last status from the GCS.

    A cluster without an autoscaling config (``ray.init()`` on a laptop, or bare
    ``ray start`` nodes) runs Ray's read-only autoscaler, whose node types are the
    live nodes themselves (named ``node_<node id>``): nothing can be launched there.
    Waits up to ``wait_s`` for the first report of a head that just started.
    """
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaling_status")
    deadline = time.monotonic() + wait_s
    while not raw and time.monotonic() < deadline:  # a head that just started: its first report
        time.sleep(0.5)
        raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        # autoscaler v2 keeps its status elsewhere; treat it as present when enabled
        return AutoscalerState(bool(ray._config.enable_autoscaler_v2()), {}, 0)
    report = json.loads(raw).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    launches = {str(k): int(v) for k, v in (report.get("pending_launches") or {}).items()}
    present = bool(launches) or any(t != f"node_{n}" for n, t in mapping.items())
    return AutoscalerState(present, launches, len(report.get("failed_nodes") or []))


def request(classes: Sequence[ResourceClass]) -> None:
    """Ask the autoscaler to make room for every pool at its full size (standing request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=demand_bundles(classes))


def release() -> None:
    """Withdraw this process's standing request so idle nodes can be scaled down."""
    import ray

    if not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):  # best effort at shutdown (the GCS may be gone)
        request_resources(bundles=[])


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{r} {v:g}" for r, v in sorted(res.items())) or "-"


def scale_for(classes: Sequence[ResourceClass], timeout_s: float, report: Report | None = None,
              poll_s: float = 1.0, every_s: float = 5.0) -> dict[str, float]:
    """Request the pools' resources and wait until they are available; return what is.

    Returns at once when the pools already fit or no autoscaler manages the cluster
    (after saying so, when they do not fit); otherwise polls every ``poll_s`` seconds
    and reports a progress line every ``every_s`` seconds, for at most ``timeout_s``.
    """
    import ray

    say = report or (lambda _msg: None)
    available = dict(ray.available_resources())
    if fits_fully(classes, available):
        return available
    request(classes)
    state = autoscaler_state()
    if not state.present:
        say(f"no autoscaler manages this cluster: the pools are fitted to the nodes that are up "
            f"(missing {_fmt(shortfall(classes, available))})")
        return available
    start = time.monotonic()
    last_said = -every_s
    while True:
        available = dict(ray.available_resources())
        elapsed = time.monotonic() - start
        if fits_fully(classes, available):
            if elapsed > 0.5:
                say(f"autoscaler: the cluster can host every client actor pool ({elapsed:.0f}s)")
            return available
        if elapsed >= timeout_s:
            say(f"autoscaler: still missing {_fmt(shortfall(classes, available))} after {timeout_s:g}s "
                "(profiles.autoscale_timeout_s); continuing with smaller pools")
            return available
        if elapsed - last_said >= every_s:
            state = autoscaler_state()
            launching = ", ".join(f"{t} x{n}" for t, n in sorted(state.pending_launches.items())) or "none yet"
            failed = f"; {state.failed_nodes} node launch(es) failed" if state.failed_nodes else ""
            say(f"waiting for the autoscaler ({elapsed:.0f}s of {timeout_s:g}s): missing "
                f"{_fmt(shortfall(classes, available))}; launching: {launching}{failed}")
            last_said = elapsed
        time.sleep(poll_s)


def shrink_note(wanted: Sequence[ResourceClass], fitted: Sequence[ResourceClass]) -> str | None:
    """A line naming the pools ``check_fits`` shrank, or None when none was."""
    parts = [f"{w.name} {w.actors or 1} -> {f.actors or 1}"
             for w, f in zip(wanted, fitted, strict=True) if (f.actors or 1) < (w.actors or 1)]
    if not parts:
        return None
    return ("the cluster cannot host every client actor now; pools shrunk: " + ", ".join(parts)
            + " (they grow again when nodes join)")


def grow_plan(current: dict[str, int], wanted: Sequence[ResourceClass],
              available: dict[str, float]) -> dict[str, int]:
    """Class -> actors to add now: pinned classes first, one actor at a time, while they fit."""
    left = dict(available)
    add: dict[str, int] = {}
    for c in sorted(wanted, key=lambda c: not (c.resources or c.num_gpus)):
        need = actor_bundle(c)
        while current.get(c.name, 0) + add.get(c.name, 0) < (c.actors or 1):
            if any(left.get(r, 0.0) + 1e-9 < v for r, v in need.items()):
                break
            for r, v in need.items():
                left[r] = left.get(r, 0.0) - v
            add[c.name] = add.get(c.name, 0) + 1
    return add
