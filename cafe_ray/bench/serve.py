"""Serving under load: a threshold exit policy versus full depth, over HTTP on loopback.

A separate Python process (a subprocess: it shares nothing with the server but loopback) runs
``concurrency`` clients with ``httpx`` that send ``requests`` predict requests, spread over
several client ids, as fast as answers come back. Each phase reports throughput, latency
percentiles, errors, and the accuracy and MACs of the answers. Phases alternate between the
threshold policy and full depth (``rounds`` times each, after a warm-up that loads every
client model), so that a slow moment of a shared machine hits both.

The threshold defaults to the cheapest one, on a grid, whose accuracy on the bench clients'
``val`` split is within 1 point of full depth (``margin``); requests carry their ``holdout`` samples
(neither split was trained on, and they are disjoint).

The workload run (``bench_config``) is Fashion-MNIST, 10 clients, FedPer-EE with the small
early-exit CNN at width 64: 22.1 MMACs per sample at full depth, 0.45 MMACs at exit 1, so that
compute, not HTTP, is most of a full-depth request's cost on a 2-core machine. Requests carry
64 samples each by default (a device's burst of images). MACs overstate the time saved on CPU:
the first stage's GroupNorm and max-pool over 64x28x28 maps are memory-bound and uncounted, so
exiting at exit 1 still costs about half of a full-depth forward in wall time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cafe_ray.config import ExperimentConfig, build_config

FORMATS = {"json": "application/json", "b64": "application/json", "npy": "application/x-npy"}
GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(10)) + (0.99, 0.995, 0.999)  # 0.5 .. 0.95, 0.99+


def bench_config(out: str | Path, rounds: int = 10, width: int = 64, algorithm: str = "fedper_ee") -> ExperimentConfig:
    """The workload run: Fashion-MNIST, 10 clients (Dirichlet 0.3), the small early-exit CNN."""
    return build_config({
        "name": "serve-bench", "seed": 0, "output_dir": str(out), "executor": "sequential",
        "data": {"name": "fashion_mnist", "num_clients": 10, "max_train_samples": 20000, "test_fraction": 0.25,
                 "partition": {"kind": "dirichlet", "alpha": 0.3, "min_size": 50}},
        "model": {"name": "cnn_small", "width": width},
        "algorithm": {"name": algorithm},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "round": {"num_rounds": rounds, "fraction": 0.5, "eval_every": rounds},
        "profiles": {"catalog": "uniform", "actors_per_class": 1},
        "checkpoint": {"every": rounds, "keep": 1},
    })


def train_bench_run(out: str | Path, rounds: int = 10, width: int = 64, algorithm: str = "fedper_ee") -> Path:
    from cafe_ray.sim.engine import run_simulation

    run_dir, _ = run_simulation(bench_config(out, rounds, width, algorithm), show_progress=False)
    return Path(run_dir)


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    client_ids: np.ndarray  # (R,) client of each request
    x: np.ndarray  # (R, S, *input_shape) samples of each request
    y: np.ndarray  # (R, S) their labels

    def bodies(self, policy: dict[str, Any], decimals: int = 5, fmt: str = "json") -> list[bytes]:
        """Request bodies. ``json``: inputs written with ``decimals`` decimals, as a client would send
        them (float32 -> tolist() would write 17 digits of float64 noise per value, 3x the bytes);
        ``b64``: JSON with ``inputs_b64`` (raw float32); ``npy``: a ``numpy.save`` body (the policy
        goes in the query string, :func:`query_string`)."""
        if fmt == "npy":
            out = []
            for xi in self.x:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(xi))
                out.append(buf.getvalue())
            return out
        if fmt == "b64":
            return [json.dumps({"inputs_b64": base64.b64encode(np.ascontiguousarray(xi).tobytes()).decode(),
                                **policy}).encode() for xi in self.x]
        return [json.dumps({"inputs": np.round(xi.astype(np.float64), decimals).tolist(), **policy}).encode()
                for xi in self.x]

    def repeated(self) -> Workload:
        """Every request of a client carries that client's first request (``hey`` repeats one body)."""
        first = {int(c): i for i, c in reversed(list(enumerate(self.client_ids)))}
        idx = np.array([first[int(c)] for c in self.client_ids])
        return Workload(self.client_ids, self.x[idx], self.y[idx])


def make_workload(run: Any, clients: list[int], requests: int, samples: int, split: str = "holdout",
                  seed: int = 0) -> Workload:
    """``requests`` requests of ``samples`` samples each, round-robin over ``clients``, each
    sample drawn from that client's ``split``."""
    rng = np.random.default_rng(seed)
    data = {c: run.client_data(c, split) for c in clients}
    cids = np.array([clients[i % len(clients)] for i in range(requests)])
    xs, ys = [], []
    for c in cids:
        x, y = data[int(c)]
        idx = rng.integers(0, x.shape[0], size=samples)
        xs.append(x[idx].numpy())
        ys.append(y[idx].numpy())
    return Workload(cids, np.stack(xs), np.stack(ys))


def calibrate_threshold(run: Any, clients: list[int], margin: float = 0.01, split: str = "val") -> float:
    """Cheapest grid threshold whose pooled ``split`` accuracy is >= full depth's - ``margin``."""
    from cafe_ray.inference.evaluate import evaluate_policy, pooled
    from cafe_ray.inference.policies import FullDepth, Threshold

    cost = run.exit_cost
    models = {c: run.client_model(c) for c in clients}
    data = {c: run.client_data(c, split) for c in clients}

    def score(policy: Any) -> Any:
        return pooled([evaluate_policy(models[c], *data[c], policy, cost) for c in clients])

    full = score(FullDepth())
    for t in GRID:
        r = score(Threshold(t))
        if r.accuracy >= full.accuracy - margin:
            return t
    return 1.0


# ------------------------------------------------------------------ load (child process)
def _load(url: str | Sequence[str], client_ids: list[int], bodies: list[bytes], concurrency: int,
          timeout_s: float, content_type: str = "application/json", query: str = "") -> dict[str, Any]:
    """Send every body once, ``concurrency`` at a time; per request latency and answer.

    Several URLs (the replicas' own ports under direct ingress): the closed-loop workers are
    dealt to them in turn, so each replica carries its share of the requests in flight."""
    import httpx

    n = len(bodies)
    lat = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int64)
    labels: list[list[int]] = [[] for _ in range(n)]
    exits: list[list[int]] = [[] for _ in range(n)]
    macs: list[list[int]] = [[] for _ in range(n)]
    nxt = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in nxt:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"/v1/clients/{client_ids[i]}/predict{query}", content=bodies[i],
                                      headers={"content-type": content_type})
                status[i] = r.status_code
                if r.status_code == 200:
                    preds = r.json()["predictions"]
                    labels[i] = [p["label"] for p in preds]
                    exits[i] = [p["exit_index"] for p in preds]
                    macs[i] = [p["macs"] for p in preds]
            except httpx.HTTPError:
                status[i] = -1
            lat[i] = time.perf_counter() - t0

    urls = [url] if isinstance(url, str) else list(url)

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=timeout_s, limits=limits))
                       for u in urls]
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(clients[k % len(clients)]) for k in range(concurrency)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    return {"wall_s": wall, "latency_s": lat.tolist(), "status": status.tolist(), "labels": labels,
            "exits": exits, "macs": macs}


def _child(job: str) -> None:
    """Entry point of the load process: ``python -m cafe_ray.bench.serve JOB.json``."""
    spec = json.loads(Path(job).read_text())
    blob = Path(spec["bodies"]).read_bytes()
    ends = np.cumsum(spec["sizes"])
    bodies = [blob[e - n : e] for e, n in zip(ends, spec["sizes"], strict=True)]
    out = _load(spec["url"], spec["client_ids"], bodies, spec["concurrency"], spec["timeout_s"],
                spec["content_type"], spec["query"])
    Path(spec["out"]).write_text(json.dumps(out))


def load_in_subprocess(url: str | Sequence[str], client_ids: list[int], bodies: list[bytes], concurrency: int,
                       workdir: Path, timeout_s: float = 60.0, content_type: str = "application/json",
                       query: str = "") -> dict[str, Any]:
    """Run :func:`_load` in a fresh Python process (it shares only loopback with the server)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bodies.bin").write_bytes(b"".join(bodies))
    job = workdir / "job.json"
    job.write_text(json.dumps({"url": url, "client_ids": client_ids, "bodies": str(workdir / "bodies.bin"),
                               "sizes": [len(b) for b in bodies], "concurrency": concurrency,
                               "timeout_s": timeout_s, "out": str(workdir / "out.json"),
                               "content_type": content_type, "query": query}))
    subprocess.run([sys.executable, "-m", "cafe_ray.bench.serve", str(job)], check=True)
    res = json.loads((workdir / "out.json").read_text())
    res["latency_s"] = np.asarray(res["latency_s"])
    res["status"] = np.asarray(res["status"])
    return res


def hey_path() -> str:
    """The ``hey`` load generator (Debian package ``hey``), or an error saying how to get it."""
    path = shutil.which("hey")
    if path is None:
        raise FileNotFoundError("--external needs the hey load generator on PATH: apt-get install -y hey "
                                "(Debian/Ubuntu), or go install github.com/rakyll/hey@latest")
    return path


def load_with_hey(url: str, client_ids: list[int], bodies: list[bytes], concurrency: int, workdir: Path,
                  timeout_s: float = 60.0, content_type: str = "application/json", query: str = "") -> dict[str, Any]:
    """The same load as :func:`load_in_subprocess`, sent by ``hey`` (an external Go client).

    ``hey`` repeats one body per process, so requests of one client must carry one body (see
    :meth:`Workload.repeated`): one ``hey`` per client runs at once, the ``concurrency`` workers
    split between them. Latency and status come from hey's per-request CSV; the answers (labels,
    exits, MACs) of each distinct body are fetched once afterwards.
    """
    import httpx

    hey = hey_path()
    workdir.mkdir(parents=True, exist_ok=True)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(client_ids):
        groups.setdefault(int(c), []).append(i)
    share = [concurrency // len(groups) + (k < concurrency % len(groups)) for k in range(len(groups))]
    procs = []
    t0 = time.perf_counter()
    for (cid, idx), workers in zip(groups.items(), share, strict=True):
        if any(bodies[i] != bodies[idx[0]] for i in idx):
            raise ValueError(f"hey sends one body per client; client {cid}'s requests differ (use Workload.repeated)")
        body = workdir / f"body{cid}.bin"
        body.write_bytes(bodies[idx[0]])
        out = (workdir / f"hey{cid}.csv").open("w")
        cmd = [hey, "-n", str(len(idx)), "-c", str(max(1, min(workers, len(idx)))), "-m", "POST",
               "-T", content_type, "-D", str(body), "-t", str(int(timeout_s)), "-o", "csv",
               f"{url}/v1/clients/{cid}/predict{query}"]
        procs.append((cid, idx, subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE), out))
    for cid, _, p, out in procs:
        _, err = p.communicate()
        out.close()
        if p.returncode != 0:
            raise RuntimeError(f"hey failed for client {cid} (exit {p.returncode}): {err.decode()[-500:]}")
    wall = time.perf_counter() - t0
    n = len(bodies)
    lat, status = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    labels: list[list[int]] = [[] for _ in range(n)]
    exits: list[list[int]] = [[] for _ in range(n)]
    macs: list[list[int]] = [[] for _ in range(n)]
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for cid, idx, _, _ in procs:
            rows = [r.split(",") for r in (workdir / f"hey{cid}.csv").read_text().splitlines()[1:] if r.strip()]
            for i, row in zip(idx, rows, strict=False):  # hey writes one row per request it completed
                lat[i], status[i] = float(row[0]), int(row[6])
            for i in idx[len(rows):]:
                status[i] = -1
            r = client.post(f"/v1/clients/{cid}/predict{query}", content=bodies[idx[0]],
                            headers={"content-type": content_type})
            if r.status_code == 200:
                preds = r.json()["predictions"]
                for i in idx:
                    if status[i] == 200:
                        labels[i] = [p["label"] for p in preds]
                        exits[i] = [p["exit_index"] for p in preds]
                        macs[i] = [p["macs"] for p in preds]
    return {"wall_s": wall, "latency_s": lat, "status": status, "labels": labels, "exits": exits, "macs": macs}


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class PhaseResult:
    label: str
    requests: int
    samples: int
    errors: int
    wall_s: float
    latency_ms: np.ndarray  # (requests,)
    accuracy: float  # over the samples of successful requests
    mean_macs: float
    exit_share: tuple[float, ...]  # fraction of samples leaving at each exit

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q))

    @property
    def mean_ms(self) -> float:
        return float(self.latency_ms.mean())

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "requests": self.requests, "samples": self.samples, "errors": self.errors,
                "wall_s": self.wall_s, "throughput_rps": self.throughput, "mean_ms": self.mean_ms,
                "p50_ms": self.pct(50), "p95_ms": self.pct(95), "p99_ms": self.pct(99), "accuracy": self.accuracy,
                "mean_macs": self.mean_macs, "exit_share": list(self.exit_share)}


def _merge(label: str, parts: list[dict[str, Any]], y: np.ndarray, num_exits: int) -> PhaseResult:
    lat = np.concatenate([p["latency_s"] for p in parts]) * 1e3
    status = np.concatenate([p["status"] for p in parts])
    ok = status == 200
    labels = [lab for p in parts for lab in p["labels"]]
    exits = [e for p in parts for e in p["exits"]]
    macs = [m for p in parts for m in p["macs"]]
    ys = np.concatenate([y] * len(parts))
    got = np.array([v for i in np.nonzero(ok)[0] for v in labels[i]])
    want = np.concatenate([ys[i] for i in np.nonzero(ok)[0]]) if ok.any() else np.array([])
    ex = np.array([v for i in np.nonzero(ok)[0] for v in exits[i]], dtype=np.int64)
    share = np.bincount(ex, minlength=num_exits) / max(len(ex), 1)
    return PhaseResult(label, len(lat), int(want.size), int((~ok).sum()), sum(p["wall_s"] for p in parts), lat,
                       float((got == want).mean()) if want.size else float("nan"),
                       float(np.mean([v for i in np.nonzero(ok)[0] for v in macs[i]])) if ok.any() else float("nan"),
                       tuple(float(s) for s in share))


@dataclass(frozen=True)
class ServeBench:
    run_dir: str
    threshold: float
    concurrency: int
    samples_per_request: int
    clients: list[int]
    full: PhaseResult
    dynamic: PhaseResult
    full_macs: int
    load: str = "httpx, json"  # load generator and body format

    @property
    def latency_ratio(self) -> float:
        """Mean latency of the threshold policy over full depth's (what the issue's target reads)."""
        return self.dynamic.mean_ms / self.full.mean_ms

    @property
    def macs_ratio(self) -> float:
        return self.dynamic.mean_macs / self.full.mean_macs

    @property
    def latency_cut(self) -> float:
        return 1.0 - self.dynamic.mean_ms / self.full.mean_ms

    @property
    def accuracy_delta_pts(self) -> float:
        return 100 * (self.dynamic.accuracy - self.full.accuracy)

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "threshold": self.threshold, "concurrency": self.concurrency,
                "samples_per_request": self.samples_per_request, "clients": self.clients,
                "full_macs": self.full_macs, "full": self.full.to_json(), "threshold_policy": self.dynamic.to_json(),
                "mean_latency_cut": self.latency_cut, "accuracy_delta_pts": self.accuracy_delta_pts,
                "latency_ratio": self.latency_ratio, "macs_ratio": self.macs_ratio, "load": self.load}


def run_bench(run_dir: str | Path, *, requests: int = 1000, concurrency: int = 8, num_clients: int = 8,
              samples: int = 64, threshold: float | None = None, rounds: int = 2, port: int | None = None,
              replicas: int = 1, threads: int = 1, address: str | None = None, url: str | None = None,
              external: bool = False, body_format: str = "json", say: Any = print,
              direct_ingress: bool = False) -> ServeBench:
    """Serve ``run_dir`` and load it from a spawned process; see the module doc.

    ``url``: load a server that already serves ``run_dir`` there (nothing is started).
    ``address``: deploy on that Ray cluster (its running Serve proxy is used as it is; ``port``
    must match it if given). ``external``: the load generator is ``hey`` (Debian package) instead
    of the Python client. ``body_format``: ``json`` (nested lists), ``b64`` (``inputs_b64``) or
    ``npy`` (an ``application/x-npy`` body). ``direct_ingress``: load the replica's own HTTP
    port (:mod:`cafe_ray.serve.ingress`, enabled before this process imported Ray Serve); with
    ``replicas`` > 1 the Python client spreads its workers over every replica's port."""
    import ray
    from ray import serve

    from cafe_ray.runs import RunArtifacts
    from cafe_ray.serve import ingress
    from cafe_ray.serve.app import running_proxy, start
    from cafe_ray.serve.config import ServeConfig, server_url

    if body_format not in FORMATS:
        raise ValueError(f"body format {body_format!r}: use one of {', '.join(FORMATS)}")
    if direct_ingress and (url is not None or address is not None or not ingress.enabled()):
        raise ValueError("direct_ingress: a local Ray started here, with cafe_ray.serve.ingress.enable_direct_ingress() "
                         "called before Ray Serve was imported; not with url or address")
    if external:
        hey_path()  # fail before any work if hey is missing
    run = RunArtifacts(run_dir)
    clients = run.client_ids[:num_clients]
    if threshold is None:
        threshold = calibrate_threshold(run, clients)
        say(f"threshold {threshold} (the cheapest within 1 point of full depth on the val split)")
    work = make_workload(run, clients, requests, samples)
    if external:
        work = work.repeated()
    warm = make_workload(run, clients, max(4 * len(clients), concurrency * 4), samples, seed=1)
    own_ray = url is None and not ray.is_initialized()
    cfg = None
    direct: list[str] = []
    if url is None:
        cfg = ServeConfig(run_dir=str(run_dir), port=port or _free_port(), replicas=replicas, threads=threads,
                          replica_cpus=0, max_models_per_replica=max(8, len(clients)),
                          batch_max_requests=max(16, concurrency), app_name="cafe-ray-bench", access_log=False,
                          route_prefix="/cafe-ray-bench")
        start(cfg, address, require={"port"} if port else set())
        host, proxy_port = running_proxy()
        url = server_url(host, proxy_port, cfg.route_prefix)
        if direct_ingress:
            direct = ingress.replica_urls(host, cfg.run_dir, cfg.replicas, cfg.route_prefix)
            if not direct:
                raise ValueError("direct ingress: no replica answered on its own port (Ray Serve >= 2.56 needed)")
            url = direct[0]
    # the Python client spreads its workers over every replica's own port; hey loads one URL
    targets = direct if direct and not external else [url]
    say(f"{'serving' if cfg else 'loading'} {run_dir} at {', '.join(targets)}; load: {concurrency} concurrent clients "
        f"({'hey' if external else 'httpx'}), {requests} requests x {samples} sample(s) per phase, {rounds} round(s)")
    ids = [int(c) for c in work.client_ids]
    policies = {"full": {"policy": "full"}, "threshold": {"policy": "threshold", "threshold": threshold}}
    bodies = {k: work.bodies(v, fmt=body_format) for k, v in policies.items()}
    ctype = FORMATS[body_format]
    query = {k: query_string(v) if body_format == "npy" else "" for k, v in policies.items()}
    parts: dict[str, list[dict[str, Any]]] = {"full": [], "threshold": []}
    tmp = Path(tempfile.mkdtemp(prefix="cafe-ray-serve-bench-"))
    load = load_with_hey if external else load_in_subprocess
    try:
        load_in_subprocess(targets, [int(c) for c in warm.client_ids], warm.bodies(policies["full"]),
                           concurrency, tmp / "warmup")
        for r in range(rounds):
            for k in ("threshold", "full") if r % 2 == 0 else ("full", "threshold"):
                parts[k].append(load(url if external else targets, ids, bodies[k], concurrency,
                                     tmp / f"{k}{r}", content_type=ctype, query=query[k]))
                say(f"  round {r + 1} {k}: {len(ids)} requests in {parts[k][-1]['wall_s']:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg is not None:
            serve.delete(cfg.app_name)
        if own_ray:
            serve.shutdown()
            ray.shutdown()
    m = run.exit_cost.num_exits
    return ServeBench(str(run_dir), threshold, concurrency, samples, clients,
                      _merge("full depth", parts["full"], work.y, m),
                      _merge(f"threshold {threshold}", parts["threshold"], work.y, m), int(run.exit_cost.cascade[-1]),
                      f"{'hey' if external else 'httpx'}, {body_format}")


def profile_request_path(run_dir: str | Path, samples: int = 64, threshold: float = 0.6, repeats: int = 30,
                         client: int | None = None) -> list[tuple[str, float]]:
    """Median milliseconds of each in-replica step of one predict request, in this process (no Serve,
    one torch thread): body decoding per format, validation, the early-exit forward per policy, and
    response encoding. What is left of an HTTP request's latency is Serve's proxy and routing."""
    import torch

    from cafe_ray.serve.app import parse_body
    from cafe_ray.serve.config import ServeConfig
    from cafe_ray.serve.core import Job, decode_npy
    from cafe_ray.serve.service import ModelService

    torch.set_num_threads(1)
    svc = ModelService(ServeConfig(run_dir=str(run_dir)))
    cid = svc.client_ids[0] if client is None else client
    x, _ = svc.run.client_data(cid, "holdout")
    x = x[torch.randint(0, x.shape[0], (samples,), generator=torch.Generator().manual_seed(0))]
    work = Workload(np.array([cid]), x.numpy()[None], np.zeros((1, samples), dtype=np.int64))
    pol = {"policy": "threshold", "threshold": threshold}
    body, b64, npy = (work.bodies(pol, fmt=f)[0] for f in ("json", "b64", "npy"))
    model = svc.load_model(cid)

    def job(name: str, params: tuple[tuple[str, Any], ...]) -> Job:
        p = svc.policy(cid, (name, params), model)
        return Job(cid, svc.validate(cid, parse_body(body, "application/json", {})[0])[0], (name, params), p,
                   False, svc.public_policy(p))

    full, dyn = job("full", ()), job("threshold", (("threshold", threshold),))
    answer = svc.run_jobs([dyn], {cid: model})[0]
    steps: dict[str, Any] = {
        f"decode+validate json ({len(body):,} B)": lambda: svc.validate(cid, parse_body(body, "application/json", {})[0]),
        f"decode+validate b64 ({len(b64):,} B)": lambda: svc.validate(cid, parse_body(b64, "application/json", {})[0]),
        f"decode+validate npy ({len(npy):,} B)": lambda: decode_npy(npy, svc.spec, svc.cfg.max_batch),
        "early-exit forward, full depth": lambda: svc.run_jobs([full], {cid: model}),
        f"early-exit forward, threshold {threshold}": lambda: svc.run_jobs([dyn], {cid: model}),
        "encode the JSON answer": answer.json_bytes,
    }
    out = []
    for name, fn in steps.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out.append((name, float(np.median(times))))
    return out


def query_string(policy: dict[str, Any]) -> str:
    """The policy fields of an ``application/x-npy`` request, as its query string."""
    from urllib.parse import urlencode

    return "?" + urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in policy.items()})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def markdown(b: ServeBench) -> str:
    rows = ["| policy | requests | errors | req/s | mean ms | p50 ms | p95 ms | p99 ms | accuracy | mean MACs | "
            "exit share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (b.full, b.dynamic):
        rows.append(f"| {r.label} | {r.requests} | {r.errors} | {r.throughput:.0f} | {r.mean_ms:.1f} | "
                    f"{r.pct(50):.1f} | {r.pct(95):.1f} | {r.pct(99):.1f} | {100 * r.accuracy:.2f}% | "
                    f"{r.mean_macs:,.0f} | {' / '.join(f'{s:.2f}' for s in r.exit_share)} |")
    rows.append("")
    rows.append(f"mean latency cut by the threshold policy: {100 * b.latency_cut:.1f}%; accuracy change: "
                f"{b.accuracy_delta_pts:+.2f} points")
    rows.append(f"threshold / full depth: mean latency {b.latency_ratio:.2f}, p50 {b.dynamic.pct(50) / b.full.pct(50):.2f}, "
                f"throughput {b.dynamic.throughput / b.full.throughput:.2f}, MACs {b.macs_ratio:.2f} "
                f"(load: {b.load}, {b.concurrency} concurrent, {b.samples_per_request} samples/request)")
    return "\n".join(rows)


if __name__ == "__main__":
    _child(sys.argv[1])
