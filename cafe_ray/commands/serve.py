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
        host: Annotated[str, typer.Option("--host", help="Bind address (0.0.0.0 exposes the API, which has "
                                          "no authentication, to the network).")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="HTTP port.")] = 8000,
        replicas: Annotated[int, typer.Option("--replicas", help="Replicas of the deployment.")] = 1,
        max_batch: Annotated[int, typer.Option("--max-batch", help="Most samples in one request "
                                               "(more: HTTP 413).")] = 256,
        batch_requests: Annotated[int, typer.Option("--batch-requests", help="serve.batch: most requests "
                                                    "merged into one model call.")] = 16,
        batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="serve.batch: how long a batch "
                                                     "waits to fill.")] = 2.0,
        max_models: Annotated[int, typer.Option("--max-models", help="Client models cached per replica "
                                                "(LRU).")] = 8,
        threads: Annotated[int, typer.Option("--threads", help="torch threads per replica.")] = 1,
        replica_cpus: Annotated[float, typer.Option("--replica-cpus", help="Ray CPUs reserved per "
                                                    "replica.")] = 1.0,
        threshold: Annotated[float, typer.Option("--threshold", help="Threshold of requests that give "
                                                 "none.")] = 0.6,
        learned: Annotated[Path | None, typer.Option("--learned", help="Learned exit policy for policy="
                                                     "learned: a `cafe-ray policy train` output (file, "
                                                     "folder, or --per-client folder).")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Ray cluster address "
                                                    "(default: a local Ray).")] = None,
    ) -> None:
        """Serve a run's personalized early-exit models over HTTP (Ray Serve) until Ctrl-C."""
        from pydantic import ValidationError
        from ray import serve

        from cafe_ray.serve.app import start
        from cafe_ray.serve.config import ServeConfig

        try:
            cfg = ServeConfig(run_dir=str(run_dir), host=host, port=port, replicas=replicas, max_batch=max_batch,
                              batch_max_requests=batch_requests, batch_wait_ms=batch_wait_ms,
                              max_models_per_replica=max_models, threads=threads, replica_cpus=replica_cpus,
                              default_threshold=threshold, learned=None if learned is None else str(learned))
        except ValidationError as err:
            _fail("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                            for e in err.errors()))
        if host not in LOOPBACK:
            err_console.print(f"[yellow]warning:[/] binding {host}: the API has no authentication; anyone who "
                              "can reach this port can query every client's model")
        try:
            start(cfg, address)
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        console.print(f"serving [bold]{cfg.run_dir}[/] at [bold]{cfg.url}[/]  "
                      f"(docs {cfg.url}/docs, schema {cfg.url}/openapi.json); Ctrl-C to stop")
        def _stop(*_: object) -> None:  # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            if address is None:
                serve.shutdown()
            else:  # a shared cluster: remove our application only
                serve.delete(cfg.app_name)

    bench = _bench_group(app)

    @bench.command("serve")
    def bench_serve(
        run_dir: Annotated[Path | None, typer.Argument(help="Run to serve (default: train the bench run, "
                                                       "Fashion-MNIST CNN width 64, FedPer-EE, into --out).")] = None,
        out: Annotated[Path, typer.Option("--out", help="Where the bench run is trained (reused if "
                                          "there).")] = Path("runs/serve-bench"),
        requests: Annotated[int, typer.Option("--requests", help="Requests per phase.")] = 1000,
        concurrency: Annotated[int, typer.Option("--concurrency", help="Concurrent HTTP clients.")] = 8,
        clients: Annotated[int, typer.Option("--clients", help="Client ids the requests spread over.")] = 8,
        samples: Annotated[int, typer.Option("--samples", help="Samples per request.")] = 64,
        threshold: Annotated[float | None, typer.Option("--threshold", help="Threshold policy (default: the "
                                                        "cheapest within 0.5 pt of full depth on val).")] = None,
        rounds: Annotated[int, typer.Option("--rounds", help="Alternating phases per policy.")] = 2,
        threads: Annotated[int, typer.Option("--threads", help="torch threads of the replica.")] = 1,
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    ) -> None:
        """HTTP load on loopback from a separate process: threshold policy vs full depth."""
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
        try:
            res = run_bench(rd, requests=requests, concurrency=concurrency, num_clients=clients, samples=samples,
                            threshold=threshold, rounds=rounds, threads=threads, say=console.print)
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        typer.echo(markdown(res))
        if json_out:
            json_out.write_text(json.dumps(res.to_json(), indent=2) + "\n")
            console.print(f"json: {json_out}")
