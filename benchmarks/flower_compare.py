"""cafe-ray against Flower's simulation engine on identical work.

The work: FedAvg-EE on cafe-ray's data partition and early-exit CNN, every client trains
every round with cafe-ray's own local SGD and seeds (so both engines run the same
computation, step for step), then every client evaluates the new global model on its test
split (per-exit accuracy, pooled over clients). Both engines run their clients on Ray
actors with one CPU and one torch thread each, on a fresh local Ray started by the run.
Timed: the whole run (Ray start to the last evaluation) and each round (training,
aggregation, evaluation). The final accuracies are printed beside the times: equal up to
the float rounding of the two aggregations (cafe-ray averages in float64, Flower in float32).

Flower pins its own Ray, so it lives in its own environment (not a dev dependency):

    python3 -m venv .flower-venv   # not with constraints.txt: Flower pins Ray 2.55.1
    .flower-venv/bin/pip install "flwr[simulation]==1.41.0" torch==2.14.1 numpy pydantic pyyaml \
        safetensors pyarrow psutil matplotlib scikit-learn
    .flower-venv/bin/pip install --no-deps -e .

then, from the project's environment, alternating the two engines:

    .venv/bin/python benchmarks/flower_compare.py --flower-python .flower-venv/bin/python \
        --clients 20 --rounds 5 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CFG_ENV = "CAFE_FLOWER_COMPARE_CONFIG"


def workload(dataset: str, clients: int, rounds: int, out: str, max_train: int | None) -> Any:
    from cafe_ray.config import build_config

    return build_config({
        "name": f"flower-compare-{dataset}", "seed": 0, "output_dir": out,
        "data": {"name": dataset, "num_clients": clients, "max_train_samples": max_train,
                 "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
                 "synthetic_samples": 20 * clients, "synthetic_shape": [1, 8, 8]},  # dataset=synthetic
        "model": {"name": "cnn_small", "width": 16},
        "algorithm": {"name": "fedavg_ee"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "round": {"num_rounds": rounds, "fraction": 1.0, "eval_every": 1, "eval_clients": "all"},
        "profiles": {"catalog": "uniform", "actors_per_class": 2},
        "checkpoint": {"every": 10_000},
    })


# ------------------------------------------------------------------------------- cafe-ray side
def run_cafe_ray(cfg: Any) -> dict[str, Any]:
    from rich.console import Console

    from cafe_ray.runs import rundir
    from cafe_ray.sim.engine import run_simulation, shutdown_ray_if_started

    t0 = time.perf_counter()
    run_dir, summary = run_simulation(cfg, show_progress=False, console=Console(quiet=True))
    total = time.perf_counter() - t0
    shutdown_ray_if_started()
    rounds = [float(r["wall_s"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS)]
    return {"engine": "cafe-ray", "total_s": total, "round_s": rounds, "acc_exit": summary["acc_exit"]}


# --------------------------------------------------------------------------------- Flower side
_CLIENT: dict[str, Any] = {}


def _client_state() -> dict[str, Any]:
    """Per Flower worker process: the config, data, partition and model, built once."""
    if not _CLIENT:
        import torch

        from cafe_ray.config import ExperimentConfig
        from cafe_ray.data import load_dataset, partition_clients
        from cafe_ray.models import make_model

        torch.set_num_threads(1)
        cfg = ExperimentConfig.model_validate_json(os.environ[CFG_ENV])
        ds = load_dataset(cfg.data, seed=cfg.seed)
        model = make_model(cfg, ds)
        _CLIENT.update(cfg=cfg, ds=ds, splits=list(partition_clients(ds, cfg.data, seed=cfg.seed)), model=model,
                       init={k: v.clone() for k, v in model.state_dict().items()})
    return _CLIENT


def _client_data(st: dict[str, Any], cid: int) -> Any:
    from cafe_ray.algorithms.base import ClientData

    return ClientData.gather(st["ds"], st["splits"][cid])  # as cafe-ray's client runner gathers it


def _flower_apps() -> tuple[Any, Any]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    def _model(st: dict[str, Any], msg: Message) -> Any:
        from cafe_ray.algorithms.base import load_params

        model = st["model"]
        model.load_state_dict(st["init"])
        load_params(model, msg.content["arrays"].to_torch_state_dict())
        return model

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        from cafe_ray.algorithms.base import ClientContext
        from cafe_ray.algorithms.training import local_sgd
        from cafe_ray.sim import seeds

        st = _client_state()
        cfg, cid = st["cfg"], int(context.node_config["partition-id"])
        t = int(msg.content["config"]["server-round"]) - 1
        model = _model(st, msg)
        data = _client_data(st, cid)
        ctx = ClientContext(cid, t, cfg.round.num_rounds, seeds.derive_seed(cfg.seed, t, cid, seeds.TRAIN))
        loss, _ = local_sgd(model, data, ctx, cfg.train)
        sd = model.state_dict()
        up = {k: sd[k].detach().clone() for k in msg.content["arrays"]}
        return Message(content=RecordDict({"arrays": ArrayRecord(up), "metrics": MetricRecord(
            {"num-examples": int(data.num_train), "train_loss": float(loss)})}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from cafe_ray.algorithms.training import exit_accuracies

        st = _client_state()
        cid = int(context.node_config["partition-id"])
        model = _model(st, msg)
        data = _client_data(st, cid)
        accs = exit_accuracies(model, data.x_test, data.y_test)
        metrics: dict[str, Any] = {"num-examples": len(data.y_test)}
        metrics.update({f"acc_exit_{k}": float(a) for k, a in enumerate(accs)})
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        st = _client_state()
        n = st["cfg"].data.num_clients
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                          min_evaluate_nodes=n, min_available_nodes=n)
        stamps = _CLIENT.setdefault("stamps", [])

        def stamp(server_round: int, arrays: ArrayRecord) -> None:  # after each round's evaluation
            stamps.append(time.perf_counter())

        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(st["init"]),
                                num_rounds=st["cfg"].round.num_rounds, evaluate_fn=stamp)
        last = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
        _CLIENT["acc_exit"] = [float(last[k]) for k in sorted(last) if k.startswith("acc_exit_")]

    return server, client


def run_flower(cfg: Any) -> dict[str, Any]:
    import logging

    from flwr.simulation import run_simulation

    os.environ[CFG_ENV] = cfg.model_dump_json()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    server, client = _flower_apps()
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.data.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    total = time.perf_counter() - t0
    stamps = _CLIENT["stamps"]
    return {"engine": "flower", "total_s": total, "round_s": [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)],
            "acc_exit": _CLIENT["acc_exit"]}


# ------------------------------------------------------------------------------------- driver
def _one(python: str, side: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--side", side, "--dataset", args.dataset, "--clients",
           str(args.clients), "--rounds", str(args.rounds)]
    if args.max_train:
        cmd += ["--max-train", str(args.max_train)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{side} run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    out["load"] = load
    return out


def _stats(xs: list[float]) -> str:
    return f"{min(xs):.2f} / {statistics.median(xs):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["cafe-ray", "flower"], help="run one engine once and print JSON")
    p.add_argument("--flower-python", default=".flower-venv/bin/python", help="Python with flwr[simulation]")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="alternated pairs")
    args = p.parse_args()
    if args.side:
        cfg = workload(args.dataset, args.clients, args.rounds, tempfile.mkdtemp(prefix="flower-compare-"),
                       args.max_train)
        res = run_cafe_ray(cfg) if args.side == "cafe-ray" else run_flower(cfg)
        print(json.dumps(res))
        return
    runs: dict[str, list[dict[str, Any]]] = {"cafe-ray": [], "flower": []}
    for _ in range(args.repeats):
        runs["flower"].append(_one(os.path.abspath(args.flower_python), "flower", args))
        runs["cafe-ray"].append(_one(sys.executable, "cafe-ray", args))
    steady = {k: [sum(r["round_s"][1:]) for r in v] for k, v in runs.items()}
    total = {k: [r["total_s"] for r in v] for k, v in runs.items()}
    print(f"{args.dataset}, {args.clients} clients, {args.rounds} rounds, train + evaluate every client "
          f"every round; {args.repeats} alternated pairs; seconds min / median")
    for k in runs:
        loads = " ".join(f"{r['load']:.1f}" for r in runs[k])
        print(f"  {k:8s} whole run {_stats(total[k])}   rounds 2..T {_stats(steady[k])}   "
              f"final acc per exit {[round(a, 4) for a in runs[k][-1]['acc_exit']]}   "
              f"load {loads}")
    ratio = (f"  Flower / cafe-ray: whole run {min(total['flower']) / min(total['cafe-ray']):.2f}x (min) "
             f"{statistics.median(total['flower']) / statistics.median(total['cafe-ray']):.2f}x (median)")
    if args.rounds > 1:
        ratio += (f"; rounds 2..T {min(steady['flower']) / min(steady['cafe-ray']):.2f}x (min) "
                  f"{statistics.median(steady['flower']) / statistics.median(steady['cafe-ray']):.2f}x (median)")
    print(ratio)


if __name__ == "__main__":
    main()
