"""The centralized upper bound: pooled data, per-client evaluation like the federated
runs, and a real Ray Train run with 2 data-parallel workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cafe_ray.data.base import ArrayDataset, ClientSplit
from cafe_ray.runs import rundir
from cafe_ray.studies.centralized import evaluate_clients, pooled_indices, run_centralized
from tests.conftest import make_tiny_een
from tests.sim.conftest import tiny_cfg

# what Simulation._finish writes: the centralized summary must have all of it
SIMULATION_SUMMARY_KEYS = {
    "name", "algorithm", "dataset", "rounds", "num_clients", "acc_exit", "acc_avg_exit", "acc_worst_client",
    "virtual_time_s", "cum_bytes_down", "cum_bytes_up", "failed_total", "dropped_late_total", "wall_time_s",
    "exit_macs", "final_checkpoint",
}


def test_pooled_indices_are_the_union_of_client_train_sets():
    splits = [ClientSplit(0, np.array([4, 1]), np.array([0])), ClientSplit(1, np.array([2, 3]), np.array([1]))]
    assert pooled_indices(splits).tolist() == [1, 2, 3, 4]


def test_evaluation_is_test_size_weighted_per_exit_with_worst_client():
    model = make_tiny_een(in_dim=8, num_classes=4, m=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=30).astype(np.int64)
    ds = ArrayDataset("toy", x[:1], y[:1], x, y, num_classes=4)
    splits = [ClientSplit(0, np.array([0]), np.arange(0, 10)), ClientSplit(1, np.array([0]), np.arange(10, 30)),
              ClientSplit(2, np.array([0]), np.array([], dtype=np.int64))]  # no test data: skipped
    rec, per_client = evaluate_clients(model, ds, splits)
    with torch.no_grad():
        preds = [z.argmax(1).numpy() for z in model(torch.from_numpy(x))]
    acc = [[float((p[s] == y[s]).mean()) for p in preds] for s in (slice(0, 10), slice(10, 30))]
    assert [r["client"] for r in per_client] == [0, 1]
    assert rec["acc_exit"] == pytest.approx([(10 * a + 20 * b) / 30 for a, b in zip(*acc, strict=True)])
    assert rec["acc_avg_exit"] == pytest.approx(np.mean(rec["acc_exit"]))
    assert rec["acc_worst_client"] == pytest.approx(min(np.mean(a) for a in acc))
    assert rec["eval_clients"] == 2


@pytest.mark.slow  # a Ray Train job with two workers
def test_centralized_upper_bound_with_two_ray_train_workers(tmp_path, ray_session):
    from cafe_ray.studies.compare import Variant, aggregate, markdown_table, run_row

    cfg = tiny_cfg(tmp_path, "round.eval_every=1")
    out, s = run_centralized(cfg, epochs=2, workers=2, use_gpu=False, out=tmp_path / "central")
    assert out == (tmp_path / "central").resolve()
    assert set(s) >= SIMULATION_SUMMARY_KEYS
    assert json.loads((out / "summary.json").read_text()) == s
    assert s["algorithm"] == "centralized" and s["workers"] == 2 and s["rounds"] == 2
    assert len(s["acc_exit"]) == len(s["exit_macs"]) == 3  # cnn_small: 3 exits
    assert s["acc_avg_exit"] > 0.5  # chance is 0.1
    assert s["acc_worst_client"] <= s["acc_avg_exit"] + 1e-9  # a weighted mean of clients >= its minimum
    assert s["cum_bytes_down"] == s["cum_bytes_up"] == 0
    records = rundir.read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1] and all(r.get("acc_exit") for r in records)
    evals = rundir.read_jsonl(out / "eval.jsonl")
    assert sorted(r["client"] for r in evals) == list(range(cfg.data.num_clients))
    weights = load_file(str(out / "model.safetensors"))
    from cafe_ray.data import load_dataset
    from cafe_ray.models import make_model

    model = make_model(cfg, load_dataset(cfg.data, seed=cfg.seed))
    model.load_state_dict(weights)  # the saved model is the experiment's architecture
    # the folder is an upper-bound row of a comparison table
    row = run_row({}, Variant("centralized", {}, "upper_bound"), 0, Path(out))
    assert row["acc_avg_exit"] == s["acc_avg_exit"] and row["curve"][-1] == (2, s["acc_avg_exit"])
    assert len(row["per_client"]) == cfg.data.num_clients  # pairs with simulations client by client
    assert "| centralized |" in markdown_table(aggregate([row]))
