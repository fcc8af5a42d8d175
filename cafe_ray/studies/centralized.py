"""Centralized upper bound with Ray Train: the federation's early-exit model trained on
the pooled training data of all clients, data parallel, evaluated per client.

The model is the experiment's own (``make_model``: same architecture, same seeded
initial weights), trained by a ``TorchTrainer`` with ``num_workers`` data-parallel
workers (DDP via ``ray.train.torch.prepare_model``; gloo on CPUs, NCCL on GPUs). The
training set is the union of every client's training indices, sharded by a
``DistributedSampler`` seeded with ``cfg.seed``; each worker uses ``train.batch_size``,
``train.lr``, ``train.momentum`` and ``train.weight_decay`` and the sum over exits of
cross-entropy (``sum_exit_ce``), the loss the federated algorithms start from.
Default length: ``round.num_rounds * train.local_epochs`` epochs (every client's
data seen as often as a client that joined every round).

Evaluation is the federated one: every client's own test split, per-exit accuracy,
test-size-weighted mean over clients (``acc_exit``), mean over exits
(``acc_avg_exit``), worst client (``acc_worst_client``). The output folder looks like
a simulation run directory (config.yaml, metrics.jsonl with one record per epoch,
eval.jsonl, metrics.parquet, accuracy.png, model.safetensors, summary.json in the
simulations' schema with ``algorithm: centralized``), so it is the upper-bound row of
a results table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cafe_ray.config import ExperimentConfig, dump_config
from cafe_ray.data.base import ArrayDataset, ClientSplit

ALGORITHM = "centralized"


def default_epochs(cfg: ExperimentConfig) -> int:
    return cfg.round.num_rounds * cfg.train.local_epochs


def pooled_indices(splits: list[ClientSplit]) -> np.ndarray:
    """Every client's training indices, once each, sorted: the pooled training set."""
    return np.unique(np.concatenate([s.train_idx for s in splits])).astype(np.int64)


@torch.no_grad()
def evaluate_clients(model: torch.nn.Module, ds: ArrayDataset, splits: list[ClientSplit],
                     device: torch.device | str = "cpu") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model on every client's test split, aggregated like ``Simulation._evaluate``.

    Returns (round-record fields, per-client records for eval.jsonl).
    """
    from cafe_ray.algorithms.training import exit_accuracies

    per_client = []
    correct_sum: np.ndarray | None = None
    n_total = 0
    for s in sorted(splits, key=lambda s: s.client_id):
        n = len(s.test_idx)
        if n == 0:
            continue
        x = torch.from_numpy(np.ascontiguousarray(ds.x_test[s.test_idx])).to(device)
        y = torch.from_numpy(np.ascontiguousarray(ds.y_test[s.test_idx])).to(device)
        accs = exit_accuracies(model, x, y)
        correct = np.array([int(round(a * n)) for a in accs])
        correct_sum = correct if correct_sum is None else correct_sum + correct
        n_total += n
        per_client.append({"client": s.client_id, "num_test": n, "acc_exit": [c / n for c in correct]})
    if not per_client:
        return {}, []
    acc_exit = [float(c) / n_total for c in correct_sum]
    rec = {
        "acc_exit": acc_exit,
        "acc_avg_exit": float(np.mean(acc_exit)),
        "acc_worst_client": float(min(np.mean(r["acc_exit"]) for r in per_client)),
        "acc_worst_client_last_exit": float(min(r["acc_exit"][-1] for r in per_client)),
        "eval_clients": len(per_client),
    }
    return rec, per_client


def _train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker: DDP training on a shard of the pooled data; rank 0 evaluates."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from cafe_ray.algorithms.training import sum_exit_ce
    from cafe_ray.models import make_model

    cfg = ExperimentConfig.model_validate_json(config["cfg_json"])
    ds, splits = config["data"]
    if isinstance(ds, ray.ObjectRef):
        ds, splits = ray.get(ds), ray.get(splits)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    epochs, eval_every = int(config["epochs"]), int(config["eval_every"])

    model = ray.train.torch.prepare_model(make_model(cfg, ds))  # same seeded init on every rank
    core = model.module if hasattr(model, "module") else model
    idx = pooled_indices(splits)
    data = TensorDataset(torch.from_numpy(np.ascontiguousarray(ds.x_train[idx])),
                         torch.from_numpy(np.ascontiguousarray(ds.y_train[idx])))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    history: list[dict[str, Any]] = []
    per_client: list[dict[str, Any]] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, samples)
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = sum_exit_ce(model, xb, yb)
            loss.backward()
            opt.step()
            stats += torch.tensor([float(loss.detach()) * len(yb), len(yb)], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(stats)
        rec: dict[str, Any] = {"round": epoch, "train_loss": float(stats[0] / max(float(stats[1]), 1.0)),
                               "samples": int(stats[1])}
        if rank == 0 and ((epoch + 1) % eval_every == 0 or epoch == epochs - 1):
            fields, per_client = evaluate_clients(core, ds, splits, device)
            rec.update(fields)
        rec["wall_s"] = time.perf_counter() - t0
        history.append(rec)
        ray.train.report({k: v for k, v in rec.items() if not isinstance(v, list)})
    if rank != 0:
        return None
    state = {k: v.detach().cpu().numpy() for k, v in core.state_dict().items()}
    return {"history": history, "eval": per_client, "state": state, "last_epoch": epochs - 1}


def run_centralized(
    cfg: ExperimentConfig,
    *,
    epochs: int | None = None,
    workers: int = 2,
    use_gpu: bool | None = None,
    eval_every: int | None = None,
    out: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train the upper bound on the connected Ray cluster; returns (output folder, summary).

    ``use_gpu=None`` uses GPUs when the cluster has one per worker. ``eval_every``
    defaults to ``round.eval_every`` epochs (and the last epoch).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import save_file

    from cafe_ray.data import load_dataset, partition_clients
    from cafe_ray.models import exit_macs, make_model
    from cafe_ray.runs import rundir

    epochs = default_epochs(cfg) if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    eval_every = eval_every or cfg.round.eval_every
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    ds = load_dataset(cfg.data, seed=cfg.seed)
    splits = partition_clients(ds, cfg.data, seed=cfg.seed)
    named = cfg.model_copy(update={"name": f"{cfg.name}-{ALGORITHM}"})
    if out is None:
        run_dir = rundir.new_run_dir(named)
    else:
        run_dir = Path(out)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(named))
    run_dir = run_dir.resolve()

    wall0 = time.perf_counter()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg_json": cfg.model_dump_json(), "data": (ray.put(ds), ray.put(splits)),
                           "epochs": epochs, "eval_every": eval_every},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"centralized training failed: {result.error}") from result.error
    ret = result.return_value
    wall = time.perf_counter() - wall0

    history = ret["history"]
    rundir.append_jsonl(run_dir / rundir.METRICS, history)
    rundir.append_jsonl(run_dir / rundir.EVAL, [{"round": ret["last_epoch"], **r} for r in ret["eval"]])
    rundir.write_parquet(history, run_dir / "metrics.parquet")
    rundir.plot_accuracy(history, run_dir / "accuracy.png", f"{cfg.name}: centralized upper bound on {cfg.data.name}")
    model_path = run_dir / "model.safetensors"
    save_file({k: torch.from_numpy(np.array(v)) for k, v in ret["state"].items()}, str(model_path))

    model = make_model(cfg, ds)
    cost = exit_macs(model, ds.input_shape, torch.int64 if ds.is_text else torch.float32)
    empty: dict[str, Any] = {}
    last = next((r for r in reversed(history) if r.get("acc_exit")), empty)
    summary = {
        "name": named.name, "algorithm": ALGORITHM, "dataset": cfg.data.name,
        "rounds": len(history), "num_clients": cfg.data.num_clients,
        "acc_exit": last.get("acc_exit"), "acc_avg_exit": last.get("acc_avg_exit"),
        "acc_worst_client": last.get("acc_worst_client"),
        "acc_worst_client_last_exit": last.get("acc_worst_client_last_exit"),
        "virtual_time_s": 0.0, "cum_bytes_down": 0, "cum_bytes_up": 0,
        "failed_total": 0, "dropped_late_total": 0,
        "wall_time_s": wall, "exit_macs": list(cost.cumulative),
        "final_checkpoint": str(model_path),
        "epochs": epochs, "workers": workers, "use_gpu": bool(use_gpu),
        "train_samples": int(len(pooled_indices(splits))), "upper_bound": True,
    }
    rundir.write_summary(run_dir, summary)
    return run_dir, summary
