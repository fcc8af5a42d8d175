"""A load ramp: p99 latency and accuracy as requests in flight grow, fixed exits versus SLO control.

At each step of the ramp (requests in flight, a closed loop: every client sends its next request
when the last is answered) three policies take turns on one server, in alternating order:
full depth, the fixed threshold that is cheapest within 1 point of full depth on ``val``, and
latency-SLO control (requests carry ``latency_slo_ms``; the server moves each client's
threshold). The SLO defaults to 1.5x the unloaded full-depth p99, measured first. A last step
back at the lowest load shows whether the controller returned to full accuracy. The first
``settle`` fraction of every phase is left out of its figures (the controller's transient and
the connection set-up, the same for every policy).

Accuracy at equal MACs: every request's samples are also run in process at each grid threshold,
so each phase's accuracy can be set beside that of the fixed threshold with the same mean MACs
(interpolated on that curve).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cafe_ray.bench.serve import (
    FORMATS,
    GRID,
    Workload,
    load_in_subprocess,
    make_workload,
    query_string,
)

POLICIES = ("full", "threshold", "slo")


@dataclass(frozen=True)
class Phase:
    policy: str
    in_flight: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    throughput: float
    accuracy: float
    mean_macs: float
    uptime: str  # the machine's load average when the phase ended

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _phase(policy: str, in_flight: int, res: dict[str, Any], work: Workload, settle: float, uptime: str) -> Phase:
    n = len(res["status"])
    keep = np.arange(n) >= int(settle * n)  # requests are sent in order: the first ones are the transient
    ok = (np.asarray(res["status"]) == 200) & keep
    lat = np.asarray(res["latency_s"])[keep] * 1e3
    right = [np.asarray(res["labels"][i]) == work.y[i] for i in np.flatnonzero(ok)]
    macs = [np.mean(res["macs"][i]) for i in np.flatnonzero(ok)]
    return Phase(policy, in_flight, int(keep.sum()), int((~ok & keep).sum()), float(np.percentile(lat, 50)),
                 float(np.percentile(lat, 99)), float(n / res["wall_s"]),
                 float(np.mean(np.concatenate(right))) if right else float("nan"),
                 float(np.mean(macs)) if macs else float("nan"), uptime)


@dataclass(frozen=True)
class Ramp:
    run_dir: str
    slo_ms: float
    unloaded_full_p99_ms: float
    threshold: float
    samples_per_request: int
    phases: list[Phase]
    curve: list[tuple[float, float]]  # (mean MACs, accuracy) of fixed thresholds on the requests' samples

    def at(self, policy: str, step: int) -> Phase:
        return [p for p in self.phases if p.policy == policy][step]

    @property
    def steps(self) -> list[int]:
        return [p.in_flight for p in self.phases if p.policy == "full"]

    def accuracy_at_macs(self, macs: float) -> float:
        """Accuracy of the fixed threshold with these mean MACs on the requests' samples (linear)."""
        xs, ys = zip(*sorted(self.curve), strict=True)
        return float(np.interp(macs, xs, ys))

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "slo_ms": self.slo_ms, "unloaded_full_p99_ms": self.unloaded_full_p99_ms,
                "threshold": self.threshold, "samples_per_request": self.samples_per_request,
                "phases": [p.to_json() for p in self.phases], "fixed_threshold_curve": self.curve}


def macs_curve(run: Any, work: Workload) -> list[tuple[float, float]]:
    """(mean MACs, accuracy) of full depth and every grid threshold on the workload's samples:
    each client's samples run once through every exit, then each threshold is read off."""
    import torch

    from cafe_ray.inference.trace import ExitTrace
    from cafe_ray.serve.slo import curve_point

    cost = run.exit_cost
    ids = np.repeat(work.client_ids, work.y.shape[1])
    x = work.x.reshape(-1, *work.x.shape[2:])
    y = work.y.reshape(-1)
    mp, ok = [], []
    for c in np.unique(ids):
        with torch.no_grad():
            tr = ExitTrace.from_model(run.client_model(int(c)), torch.from_numpy(x[ids == c]),
                                      torch.from_numpy(y[ids == c]), cost)
        z = np.exp(tr.logits - tr.logits.max(axis=2, keepdims=True))
        mp.append(z.max(axis=2) / z.sum(axis=2))
        ok.append(tr.logits.argmax(axis=2) == tr.labels[:, None])
    mp_all, ok_all = np.concatenate(mp), np.concatenate(ok)
    pts = [curve_point(mp_all, ok_all, cost.cascade, t) for t in (None, 0.0, *GRID)]
    return [(p.macs, p.accuracy) for p in pts]


def _uptime() -> str:
    import os

    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_ramp(run_dir: str | Path, steps: list[int], *, requests: int = 300, samples: int = 64, num_clients: int = 8,
             slo_ms: float | None = None, threshold: float | None = None, max_accuracy_drop: float = 1.0,
             slo_curve: str = "pooled", replicas: int = 1,
             settle: float = 0.25, body_format: str = "npy", direct_ingress: bool = False, port: int | None = None,
             threads: int = 1, say: Any = print) -> Ramp:
    """Serve ``run_dir`` on a local Ray and ramp the load (see the module doc)."""
    import ray
    from ray import serve

    from cafe_ray.bench.serve import _free_port, calibrate_threshold
    from cafe_ray.runs import RunArtifacts
    from cafe_ray.serve import ingress
    from cafe_ray.serve.app import running_proxy, start
    from cafe_ray.serve.config import ServeConfig, server_url

    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"--ramp: requests in flight must be >= 1, got {steps}")
    if direct_ingress and not ingress.enabled():
        raise ValueError("direct_ingress: call cafe_ray.serve.ingress.enable_direct_ingress() before Ray Serve is "
                         "imported")
    run = RunArtifacts(run_dir)
    clients = run.client_ids[:num_clients]
    if threshold is None:
        threshold = calibrate_threshold(run, clients)
        say(f"fixed threshold {threshold} (the cheapest within 1 point of full depth on the val split)")
    n_req = max(requests, 8 * max(steps))
    work = make_workload(run, clients, n_req, samples)
    say("fixed-threshold accuracy-vs-MACs curve on the requests' samples ...")
    curve = macs_curve(run, work)
    cfg = ServeConfig(run_dir=str(run_dir), port=port or _free_port(), threads=threads, replica_cpus=0,
                      replicas=replicas,
                      max_models_per_replica=max(8, len(clients)), batch_max_requests=max(16, min(max(steps), 64)),
                      app_name="cafe-ray-ramp", access_log=False, route_prefix="/cafe-ray-ramp",
                      max_accuracy_drop=max_accuracy_drop, slo_curve=slo_curve)
    own_ray = not ray.is_initialized()
    start(cfg, None, require={"port"} if port else set())
    host, proxy_port = running_proxy()
    targets = [server_url(host, proxy_port, cfg.route_prefix)]
    if direct_ingress:  # the load's workers are dealt to the replicas' own ports in turn
        targets = ingress.replica_urls(host, cfg.run_dir, replicas, cfg.route_prefix)
        if len(targets) < replicas:
            raise ValueError(f"direct ingress: {len(targets)} of {replicas} replicas answered on their own port "
                             "(Ray Serve >= 2.56 needed)")
    ids = [int(c) for c in work.client_ids]
    ctype = FORMATS[body_format]
    tmp = Path(tempfile.mkdtemp(prefix="cafe-ray-ramp-"))

    def load(policy: dict[str, Any], in_flight: int, tag: str, n: int = n_req) -> dict[str, Any]:
        bodies = work.bodies(policy, fmt=body_format)[:n]
        query = query_string(policy) if body_format == "npy" else ""
        return load_in_subprocess(targets, ids[:n], bodies, in_flight, tmp / tag, content_type=ctype, query=query)

    phases: list[Phase] = []
    try:
        say(f"serving at {', '.join(targets)}; warm-up")
        load({"policy": "full"}, 4, "warmup")
        base = load({"policy": "full"}, 1, "unloaded")
        unloaded = _phase("full", 1, base, work, settle, _uptime())
        slo = slo_ms if slo_ms is not None else round(1.5 * unloaded.p99_ms, 1)
        say(f"unloaded full-depth p99 {unloaded.p99_ms:.1f} ms -> latency SLO {slo:.1f} ms (load {_uptime()})")
        policies = {"full": {"policy": "full"}, "threshold": {"policy": "threshold", "threshold": threshold},
                    "slo": {"latency_slo_ms": slo}}
        for i, c in enumerate([*steps, steps[0]]):  # the last step: load drops back
            order = POLICIES if i % 2 == 0 else POLICIES[::-1]
            for name in order:
                res = load(policies[name], c, f"{name}{i}")
                phases.append(_phase(name, c, res, work, settle, _uptime()))
                p = phases[-1]
                say(f"  {c:>3} in flight {name:>9}: p99 {p.p99_ms:7.1f} ms, accuracy {100 * p.accuracy:.2f}%, "
                    f"MACs {p.mean_macs / 1e6:.2f}M, {p.throughput:.0f} req/s (load {p.uptime})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        serve.delete(cfg.app_name)
        if own_ray:
            from cafe_ray.serve.app import stop

            stop(cfg.app_name, own_ray=True)
    return Ramp(str(run_dir), float(slo), unloaded.p99_ms, float(threshold), samples, phases, curve)


def markdown(r: Ramp) -> str:
    """The ramp table: one row per step, the three policies side by side."""
    rows = [f"latency SLO {r.slo_ms:.1f} ms (1.5x the unloaded full-depth p99 {r.unloaded_full_p99_ms:.1f} ms unless "
            f"given); fixed threshold {r.threshold}; {r.samples_per_request} samples per request", "",
            "| in flight | full: p99 ms / acc | threshold: p99 ms / acc / MACs | SLO: p99 ms / acc / MACs | "
            "fixed threshold's acc at the SLO's MACs | SLO met (full / SLO) | load avg |",
            "|---|---|---|---|---|---|---|"]
    n = len(r.steps)
    for i in range(n):
        f, t, s = r.at("full", i), r.at("threshold", i), r.at("slo", i)
        step = f"{f.in_flight}" + (" (load drops)" if i == n - 1 else "")
        met = f"{'yes' if f.p99_ms <= r.slo_ms else 'no'} / {'yes' if s.p99_ms <= r.slo_ms else 'no'}"
        rows.append(f"| {step} | {f.p99_ms:.1f} / {100 * f.accuracy:.2f}% | {t.p99_ms:.1f} / {100 * t.accuracy:.2f}% / "
                    f"{t.mean_macs / 1e6:.2f}M | {s.p99_ms:.1f} / {100 * s.accuracy:.2f}% / {s.mean_macs / 1e6:.2f}M | "
                    f"{100 * r.accuracy_at_macs(s.mean_macs):.2f}% | {met} | {s.uptime} |")
    return "\n".join(rows)


def plot(r: Ramp, path: str | Path) -> Path:
    """p99 latency and accuracy against requests in flight, the three policies and the SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(r.steps) - 1  # the ramp up; the last step (load drops) is marked apart
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"full": "full depth", "threshold": f"fixed threshold {r.threshold}", "slo": "SLO control"}
    for name, style in zip(POLICIES, ("o-", "s-", "^-"), strict=True):
        ps = [r.at(name, i) for i in range(n + 1)]
        x = [p.in_flight for p in ps[:n]]
        line = a.plot(x, [p.p99_ms for p in ps[:n]], style, label=labels[name])[0]
        a.plot([x[-1] * 1.3], [ps[n].p99_ms], style[0], color=line.get_color(), alpha=0.5)
        b.plot(x, [100 * p.accuracy for p in ps[:n]], style, label=labels[name], color=line.get_color())
        b.plot([x[-1] * 1.3], [100 * ps[n].accuracy], style[0], color=line.get_color(), alpha=0.5)
    a.axhline(r.slo_ms, color="k", ls="--", lw=1, label=f"SLO {r.slo_ms:.0f} ms")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight (last, faded: load drops back)")
    a.set_yscale("log")
    a.set_ylabel("p99 latency (ms)")
    b.set_ylabel("accuracy on the requests' samples (%)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
