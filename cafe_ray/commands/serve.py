"""`cafe-ray serve` (Ray Serve HTTP API + handle) and `cafe-ray bench serve` (load benchmark)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _fail(msg: str) -> None:
    err_console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


def _bench_group(app: typer.Typer) -> typer.Typer:
    """The `bench` sub-typer registered by cli.py (or a new one if it is missing)."""
    for g in app.registered_groups:
        if g.name == "bench" and g.typer_instance is not None:
            return g.typer_instance
    bench = typer.Typer(no_args_is_help=True, help="Performance benchmarks.")
    app.add_typer(bench, name="bench")
    return bench


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cafe-ray simulate`.")],
        host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1; 0.0.0.0 "
                                                 "exposes the API, which has no authentication, to the network). "
                                                 "If Serve already runs on the cluster, it must match its proxy.")
                        ] = None,
        port: Annotated[int | None, typer.Option("--port", help="HTTP port (default 8000). If Serve already runs "
                                                 "on the cluster, it must match its proxy; without --port the "
                                                 "running proxy's port is used.")] = None,
        replicas: Annotated[int, typer.Option("--replicas", help="Replicas of the deployment.")] = 1,
        max_batch: Annotated[int, typer.Option("--max-batch", help="Most samples in one request "
                                               "(more: HTTP 413).")] = 256,
        max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body in MiB, "
                                                   "checked before parsing (more: HTTP 413).")] = 16.0,
        batch_requests: Annotated[int, typer.Option("--batch-requests", help="serve.batch: most requests "
                                                    "merged into one model call.")] = 16,
        batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="serve.batch: how long a batch "
                                                     "waits to fill.")] = 2.0,
        batch_samples: Annotated[int, typer.Option("--batch-samples", help="Most samples of one client model "
                                                   "merged into one forward pass (larger merged batches cost "
                                                   "more per sample on CPU).")] = 128,
        max_models: Annotated[int, typer.Option("--max-models", help="Client models cached per replica "
                                                "(LRU).")] = 8,
        threads: Annotated[int, typer.Option("--threads", help="torch threads per replica.")] = 1,
        replica_cpus: Annotated[float, typer.Option("--replica-cpus", help="Ray CPUs reserved per "
                                                    "replica.")] = 1.0,
        threshold: Annotated[float, typer.Option("--threshold", help="Threshold of requests that give "
                                                 "none.")] = 0.6,
        learned: Annotated[Path | None, typer.Option("--learned", help="Learned exit policy for policy="
                                                     "learned: a `cafe-ray policy train` output (file, "
                                                     "folder, or --per-client folder) or a `cafe-ray "
                                                     "policy fit` output.")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Ray cluster address "
                                                    "(default: a local Ray).")] = None,
        app_name: Annotated[str, typer.Option("--app-name", help="Serve application name (several runs can "
                                              "share one cluster's proxy under different names).")] = "cafe-ray",
        route_prefix: Annotated[str, typer.Option("--route-prefix", help="HTTP route prefix of the "
                                                  "application, e.g. /digits.")] = "/",
        access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Serve's per-request "
                                                 "access log lines (off: less work per request).")] = True,
        direct_ingress: Annotated[bool, typer.Option("--direct-ingress", help="Each replica also answers HTTP "
                                                     "on its own port, without the proxy hop (Ray Serve's "
                                                     "experimental direct ingress; a local Ray only); the "
                                                     "replicas' URLs are printed.")] = False,
        latency_slo_ms: Annotated[float | None, typer.Option("--latency-slo-ms", help="p99 latency target (ms) "
                                                             "of requests that name no policy: each client's "
                                                             "exit threshold moves along its validation accuracy-"
                                                             "vs-MACs curve to hold it (a request can set its "
                                                             "own with latency_slo_ms).")] = None,
        max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="Accuracy floor of the "
                                                         "latency-SLO control: at most this many points of "
                                                         "validation accuracy below full depth.")] = 1.0,
        slo_curve: Annotated[str, typer.Option("--slo-curve", help="Latency-SLO control's thresholds: 'pooled' "
                                               "(one ladder from all clients' validation scores, which a "
                                               "client leaves early only where its own split is clearly below "
                                               "the floor) or 'client' (each client's own validation front).")
                             ] = "pooled",
        autoscale: Annotated[str | None, typer.Option("--autoscale", help="MIN:MAX replicas, scaled by Ray "
                                                      "Serve on ongoing requests per replica (replaces "
                                                      "--replicas).")] = None,
        target_ongoing: Annotated[float, typer.Option("--target-ongoing", help="Autoscaling: ongoing requests "
                                                      "per replica to aim for.")] = 2.0,
    ) -> None:
        """Serve a run's personalized early-exit models over HTTP (Ray Serve) until Ctrl-C or SIGTERM."""
        from pydantic import ValidationError

        from cafe_ray.serve import ingress

        if direct_ingress:
            if address is not None:
                _fail("--direct-ingress needs the local Ray this command starts; on a cluster, start every node "
                      f"with {ingress.ENV}=1 in its environment (before `ray start`) and drop --direct-ingress")
            ingress.enable_direct_ingress()  # before Ray Serve is imported and before Ray starts
        from cafe_ray.serve.app import running_proxy, start, stop
        from cafe_ray.serve.config import ServeConfig, server_url

        given = {f for f, v in (("host", host), ("port", port)) if v is not None}
        scale = None
        if autoscale is not None:
            lo, _, hi = autoscale.partition(":")
            if not (lo.strip().isdigit() and hi.strip().isdigit()):
                _fail(f"--autoscale: give MIN:MAX replicas, e.g. 1:4 (got {autoscale!r})")
            scale = (int(lo), int(hi))
        try:
            cfg = ServeConfig(run_dir=str(run_dir), host=host or "127.0.0.1", port=8000 if port is None else port,
                              replicas=replicas, max_batch=max_batch, max_body_bytes=int(max_body_mb * 2**20),
                              app_name=app_name, route_prefix=route_prefix, access_log=access_log,
                              batch_max_requests=batch_requests, batch_wait_ms=batch_wait_ms,
                              batch_max_samples=batch_samples,
                              max_models_per_replica=max_models, threads=threads, replica_cpus=replica_cpus,
                              default_threshold=threshold, learned=None if learned is None else str(learned),
                              latency_slo_ms=latency_slo_ms, max_accuracy_drop=max_accuracy_drop, slo_curve=slo_curve,
                              autoscale=scale, target_ongoing_requests=target_ongoing)
        except ValidationError as err:
            _fail("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                            for e in err.errors()))
        import ray

        # Only a Ray this command starts is ours to end: in a notebook or a test session that has
        # Ray (and maybe Serve) running already, a failed start must leave them as they were.
        own_ray = address is None and not ray.is_initialized()
        try:
            start(cfg, address, require=given)
        except (FileNotFoundError, ValueError, RuntimeError) as err:  # RuntimeError: Serve could not deploy
            stop(cfg.app_name, own_ray=own_ray)
            _fail(str(err))

        def _stop(*_: object) -> None:  # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)  # after Ray's start: it installs a handler of its own
        real_host, real_port = running_proxy()
        if real_host not in LOOPBACK:
            err_console.print(f"[yellow]warning:[/] the proxy binds {real_host}: the API has no authentication; "
                              "anyone who can reach this port can query every client's model")
        url = server_url(real_host, real_port, cfg.route_prefix)
        if (real_host, real_port) != (cfg.host, cfg.port):
            console.print(f"Serve was already running on this cluster: using its proxy on {real_host}:{real_port}")
        console.print(f"serving [bold]{cfg.run_dir}[/] at [bold]{url}[/]  "
                      f"(docs {url}/docs, schema {url}/openapi.json); Ctrl-C to stop", soft_wrap=True)
        if direct_ingress:
            direct = ingress.replica_urls(real_host, cfg.run_dir, cfg.replicas, cfg.route_prefix)
            for i, u in enumerate(direct, 1):
                console.print(f"direct ingress: replica {i} at [bold]{u}[/] (no proxy hop)", soft_wrap=True)
            if len(direct) < cfg.replicas:
                err_console.print(f"[yellow]warning:[/] direct ingress: {len(direct)} of {cfg.replicas} replicas "
                                  "answered on their own port; the proxy URL above serves them all")
        if cfg.latency_slo_ms is not None:
            console.print(f"latency SLO: p99 <= {cfg.latency_slo_ms:g} ms for requests that name no policy, at most "
                          f"{cfg.max_accuracy_drop:g} points of val accuracy below full depth; GET {url}/v1/stats")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:  # a second signal must not cut the cleanup short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            stop(cfg.app_name, own_ray=own_ray)  # a shared cluster: our application only

    bench = _bench_group(app)

    @bench.command("serve")
    def bench_serve(
        run_dir: Annotated[Path | None, typer.Argument(help="Run to serve (default: train the bench run, "
                                                       "Fashion-MNIST CNN width 64, FedPer-EE, into --out).")] = None,
        out: Annotated[Path, typer.Option("--out", help="Where the bench run is trained (reused if "
                                          "there).")] = Path("runs/serve-bench"),
        requests: Annotated[int | None, typer.Option("--requests", help="Requests per phase (default 1000; "
                                                     "--ramp: 300, at least 8 per request in flight).")] = None,
        concurrency: Annotated[int, typer.Option("--concurrency", help="Concurrent HTTP clients.")] = 8,
        clients: Annotated[int, typer.Option("--clients", help="Client ids the requests spread over.")] = 8,
        samples: Annotated[int, typer.Option("--samples", help="Samples per request.")] = 64,
        threshold: Annotated[float | None, typer.Option("--threshold", help="Threshold policy (default: the "
                                                        "cheapest within 1 point of full depth on val).")] = None,
        rounds: Annotated[int, typer.Option("--rounds", help="Alternating phases per policy.")] = 2,
        threads: Annotated[int, typer.Option("--threads", help="torch threads of the replica.")] = 1,
        replicas: Annotated[int, typer.Option("--replicas", min=1, help="Replicas of the bench application (with "
                                              "--direct-ingress the load is spread over their ports).")] = 1,
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Deploy on this Ray cluster (its running "
                                                    "Serve proxy is used as it is).")] = None,
        port: Annotated[int | None, typer.Option("--port", help="HTTP port of the Serve proxy (default: a free "
                                                 "one; must match a proxy already running).")] = None,
        url: Annotated[str | None, typer.Option("--url", help="Load a server already serving RUN_DIR at this URL "
                                                "(e.g. http://127.0.0.1:8000); starts nothing.")] = None,
        external: Annotated[bool, typer.Option("--external", help="Generate the load with hey (apt-get install "
                                               "-y hey), one body per client, instead of the Python client.")
                            ] = False,
        body: Annotated[str, typer.Option("--body", help="Request body format: json (nested lists), b64 "
                                          "(inputs_b64, raw float32) or npy (application/x-npy).")] = "json",
        profile: Annotated[bool, typer.Option("--profile", help="Only time the in-replica steps of one request "
                                              "(decode, validate, forward, encode) in this process.")] = False,
        direct_ingress: Annotated[bool, typer.Option("--direct-ingress", help="Send the load to the replica's "
                                                     "own HTTP port (Ray Serve's experimental direct ingress), "
                                                     "not through the proxy; a local Ray only.")] = False,
        ramp: Annotated[str | None, typer.Option("--ramp", help="Load ramp: requests in flight per step, e.g. "
                                                 "1,2,4,8,16,32; p99 and accuracy of full depth, the fixed "
                                                 "threshold and latency-SLO control at each step (then one step "
                                                 "back at the first load).")] = None,
        latency_slo_ms: Annotated[float | None, typer.Option("--latency-slo-ms", help="--ramp: the SLO "
                                                             "(default: 1.5x the unloaded full-depth p99, "
                                                             "measured first).")] = None,
        max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="--ramp: the server's "
                                                         "accuracy floor for SLO control (val points below "
                                                         "full depth).")] = 1.0,
        slo_curve: Annotated[str, typer.Option("--slo-curve", help="--ramp: the server's SLO thresholds, "
                                               "'pooled' or 'client' (as `cafe-ray serve --slo-curve`).")
                             ] = "pooled",
        plot_out: Annotated[Path | None, typer.Option("--plot", help="--ramp: write p99 and accuracy against "
                                                      "load to this PNG.")] = None,
    ) -> None:
        """HTTP load on loopback from a separate process: threshold policy vs full depth, or a load ramp
        with latency-SLO control beside them (--ramp)."""
        import os

        from cafe_ray.serve import ingress

        if direct_ingress:
            if url is not None or address is not None:
                _fail("--direct-ingress deploys on the local Ray this command starts; it cannot be combined with "
                      "--url or --address (give --url the replica's own URL instead)")
            ingress.enable_direct_ingress()  # before Ray Serve is imported and before Ray starts
        from cafe_ray.bench.serve import markdown, run_bench, train_bench_run

        rd = run_dir
        if rd is None:
            done = sorted(out.glob("serve-bench-*/summary.json"))
            if done:
                rd = done[-1].parent
                console.print(f"bench run: {rd} (reused)")
            else:
                console.print(f"training the bench run into {out} (Fashion-MNIST, about 6 minutes on 2 cores)")
                try:
                    rd = train_bench_run(out)
                except (FileNotFoundError, ValueError) as err:
                    _fail(str(err))
        if profile:
            from cafe_ray.bench.serve import profile_request_path

            load = os.getloadavg()
            rows = profile_request_path(rd, samples=samples, threshold=0.6 if threshold is None else threshold)
            typer.echo("| step (median of 30, one torch thread) | ms |\n|---|---|")
            for name, ms in rows:
                typer.echo(f"| {name} | {ms:.3f} |")
            typer.echo(f"load average before: {' '.join(f'{v:.2f}' for v in load)} on {os.cpu_count()} CPUs")
            return
        if ramp is not None:
            _ramp(rd, ramp, requests=requests, samples=samples, clients=clients, slo_ms=latency_slo_ms,
                  threshold=threshold, max_accuracy_drop=max_accuracy_drop, slo_curve=slo_curve,
                  body=body, direct_ingress=direct_ingress, replicas=replicas,
                  port=port, threads=threads, plot_out=plot_out, json_out=json_out, url=url, address=address)
            return
        if url is not None and (address is not None or port is not None):
            _fail("--url loads a server that is already running; it cannot be combined with --address or --port")
        load_before = os.getloadavg()
        try:
            res = run_bench(rd, requests=requests or 1000, concurrency=concurrency, num_clients=clients, samples=samples,
                            threshold=threshold, rounds=rounds, threads=threads, replicas=replicas, address=address,
                            port=port, url=None if url is None else url.rstrip("/"), external=external,
                            body_format=body, say=console.print, direct_ingress=direct_ingress)
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        typer.echo(markdown(res))
        typer.echo(f"load average (1/5/15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}; after: "
                   f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
        if json_out:
            json_out.write_text(json.dumps(res.to_json(), indent=2) + "\n")
            console.print(f"json: {json_out}")


def _ramp(run_dir: Path, spec: str, *, requests: int | None, samples: int, clients: int, slo_ms: float | None,
          threshold: float | None, max_accuracy_drop: float, slo_curve: str, body: str, direct_ingress: bool,
          port: int | None, threads: int, replicas: int, plot_out: Path | None, json_out: Path | None,
          url: str | None, address: str | None) -> None:
    """`bench serve --ramp`: see :mod:`cafe_ray.bench.ramp`."""
    import os
    from typing import get_args

    from cafe_ray.bench import ramp as rp
    from cafe_ray.serve.config import SloCurve

    if slo_curve not in get_args(SloCurve):
        _fail(f"--slo-curve: {' or '.join(map(repr, get_args(SloCurve)))} (got {slo_curve!r})")
    if url is not None or address is not None:
        _fail("--ramp deploys its own application on a local Ray (its SLO and accuracy floor); drop --url/--address")
    try:
        steps = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        _fail(f"--ramp: requests in flight as integers, e.g. 1,2,4,8 (got {spec!r})")
    load_before = os.getloadavg()
    try:
        res = rp.run_ramp(run_dir, steps, requests=requests or 300, samples=samples,
                          num_clients=clients, slo_ms=slo_ms, threshold=threshold,
                          max_accuracy_drop=max_accuracy_drop, slo_curve=slo_curve, replicas=replicas, body_format=body,
                          direct_ingress=direct_ingress, port=port, threads=threads, say=console.print)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(rp.markdown(res))
    typer.echo(f"load average (1/5/15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}; after: "
               f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    if plot_out:
        console.print(f"plot: {rp.plot(res, plot_out)}")
    if json_out:
        json_out.write_text(json.dumps(res.to_json(), indent=2) + "\n")
        console.print(f"json: {json_out}")
