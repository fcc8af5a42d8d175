"""Read a finished run directory back: config, data, splits, and each client's
trained personal early-exit model, as the algorithm would run it at inference.

Everything loads without pickle (YAML, JSON, npz without pickle, safetensors).
Evaluation, the gym environment and serving all start here.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from cafe_ray.algorithms import ClientContext, ClientData, ServerState, build_algorithm
from cafe_ray.config import ExperimentConfig, load_saved_config
from cafe_ray.data import ArrayDataset, ClientSplit, load_dataset
from cafe_ray.models import EarlyExitNet, ExitCost, exit_macs, make_model
from cafe_ray.runs import rundir
from cafe_ray.runs.store import ClientStateStore


class RunArtifacts:
    """A trained run: ``client_model(i)`` is client i's personal dynamic model."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        if not rundir.is_run_dir(self.run_dir):
            raise FileNotFoundError(f"{self.run_dir} is not a run directory (no config.yaml); "
                                    "pass a directory written by `cafe-ray simulate`")
        self.checkpoint = rundir.latest_checkpoint(self.run_dir)
        if self.checkpoint is None:
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint yet; let the run finish or resume it")
        self.cfg: ExperimentConfig = load_saved_config(self.run_dir / rundir.CONFIG)
        self.algorithm = build_algorithm(self.cfg)
        tensors, st = rundir.read_checkpoint(self.checkpoint)
        self.round = int(st["round"])
        self.state = ServerState(tensors=tensors, meta=st["meta"])
        self.store = ClientStateStore(self.checkpoint / "store")

    @cached_property
    def dataset(self) -> ArrayDataset:
        return load_dataset(self.cfg.data, seed=self.cfg.seed)

    @cached_property
    def splits(self) -> dict[int, ClientSplit]:
        return {s.client_id: s for s in rundir.load_splits(self.run_dir / rundir.SPLITS)}

    @cached_property
    def profiles(self) -> dict[int, dict]:
        return rundir.read_profiles(self.run_dir)

    @property
    def client_ids(self) -> list[int]:
        return sorted(self.splits)

    @cached_property
    def exit_cost(self) -> ExitCost:
        m = make_model(self.cfg, self.dataset)
        return exit_macs(m, self.dataset.input_shape, torch.int64 if self.dataset.is_text else torch.float32)

    def _data(self, client_id: int) -> ClientData:
        return ClientData.gather(self.dataset, self.splits[client_id])

    def client_model(self, client_id: int) -> EarlyExitNet:
        """A fresh model holding client ``client_id``'s inference weights (eval mode)."""
        if client_id not in self.splits:
            raise KeyError(f"client {client_id} is not in this run (clients 0..{len(self.splits) - 1})")
        model = make_model(self.cfg, self.dataset)
        data = self._data(client_id)
        ctx = ClientContext(client_id, self.round, self.cfg.round.num_rounds, self.cfg.seed)
        self.algorithm.load_for_eval(model, self.algorithm.eval_payload(self.state),
                                     self.store.load(client_id), data, ctx)
        return model.eval()

    def client_data(self, client_id: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of a client's split.

        'train' and 'test' are the simulation's splits. With a validation split
        (``data.val_fraction > 0``) 'val' is that split and 'holdout' the whole test
        split; without one, 'val' and 'holdout' halve the test split with a seeded
        permutation. Either way: calibrate a policy on 'val', report it on 'holdout',
        and neither was trained on.
        """
        d = self._data(client_id)
        if split == "test":
            return d.x_test, d.y_test
        if split == "train":
            return d.x_train, d.y_train
        if d.x_val is not None and split in ("val", "holdout"):
            return (d.x_val, d.y_val) if split == "val" else (d.x_test, d.y_test)
        if split in ("val", "holdout"):
            n = int(d.y_test.shape[0])
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + client_id)
            perm = torch.randperm(n, generator=g)
            idx = perm[: n // 2] if split == "val" else perm[n // 2 :]
            return d.x_test[idx], d.y_test[idx]
        raise ValueError(f"split must be 'train', 'test', 'val' or 'holdout', got {split!r}")

    def summary(self) -> dict:
        return rundir.read_summary(self.run_dir)

    def last_eval(self) -> dict[int, list[float]]:
        """Each client's per-exit test accuracy at the run's last evaluation."""
        return rundir.last_eval(self.run_dir)
