"""Exit traces: every exit's logits for a set of samples, computed once.

A trace is what a *decision* about exiting needs and nothing more: per sample and
exit the logits, the label, and the cascade MACs of reaching each exit. The gym
environment steps through traces (so stepping costs an index, not a forward
pass), and the budget policy calibrates its threshold on one. Accuracy-versus-MACs
*evaluation* does not use traces: it runs each sample only to the exit its policy
takes (:func:`cafe_ray.inference.predict_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from cafe_ray.inference.policies import confidence_features
from cafe_ray.models import EarlyExitNet, ExitCost

if TYPE_CHECKING:
    from cafe_ray.runs import RunArtifacts


def cascade_macs(cost: ExitCost | Sequence[int] | np.ndarray) -> np.ndarray:
    """(m,) int64 MACs to reach each exit having run every stage *and head* before it.

    An :class:`ExitCost` gives its ``cascade``; a plain sequence is taken as already
    being that cascade (strictly increasing, positive).
    """
    arr = np.asarray(cost.cascade if isinstance(cost, ExitCost) else cost, dtype=np.int64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"exit MACs: need one value per exit (m >= 2), got shape {arr.shape}")
    if arr[0] <= 0 or np.any(np.diff(arr) <= 0):
        raise ValueError(f"exit MACs must be positive and strictly increasing (cascade cost of reaching "
                         f"each exit), got {arr.tolist()}; pass ExitCost.cascade, not per-stage MACs")
    return arr


@dataclass(frozen=True)
class ExitTrace:
    """Every exit's logits for N samples of one model (or pooled over clients)."""

    logits: np.ndarray  # (N, m, C) float32: exit k's logits for sample i
    labels: np.ndarray  # (N,) int64 true labels
    exit_macs: np.ndarray = field(repr=False)  # (m,) int64 cascade MACs to reach exit k

    def __post_init__(self) -> None:
        logits = np.ascontiguousarray(self.logits, dtype=np.float32)
        labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        macs = cascade_macs(self.exit_macs)
        if logits.ndim != 3:
            raise ValueError(f"logits must be (N, num_exits, num_classes), got shape {logits.shape}")
        n, m, c = logits.shape
        if n == 0:
            raise ValueError("an exit trace needs at least one sample, got N=0")
        if c < 2:
            raise ValueError(f"need at least 2 classes, got logits with C={c}")
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},) to match logits {logits.shape}, got {labels.shape}")
        if labels.min() < 0 or labels.max() >= c:
            raise ValueError(f"labels must lie in [0, {c - 1}], got range [{labels.min()}, {labels.max()}]")
        if macs.shape != (m,):
            raise ValueError(f"exit MACs: {macs.size} values for {m} exits (logits {logits.shape})")
        if not np.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf")
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "exit_macs", macs)

    # ---------------------------------------------------------------- shape
    @property
    def num_samples(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    @property
    def full_macs(self) -> int:
        """MACs of running every exit (the cascade to the last one)."""
        return int(self.exit_macs[-1])

    # --------------------------------------------------------------- derived
    @cached_property
    def probs(self) -> np.ndarray:
        """(N, m, C) float32 softmax, computed as predict_batch computes it."""
        return torch.from_numpy(self.logits).softmax(dim=2).numpy()

    @cached_property
    def confidence(self) -> np.ndarray:
        """(N, m, 3) float32: max probability, margin, entropy of every exit."""
        n, m, c = self.logits.shape
        f = confidence_features(torch.from_numpy(self.probs.reshape(n * m, c)))  # (N*m, 3)
        return f.reshape(n, m, 3).numpy()

    @cached_property
    def correct(self) -> np.ndarray:
        """(N, m) bool: is exit k's argmax the label."""
        return self.logits.argmax(axis=2) == self.labels[:, None]

    def threshold_exits(self, threshold: float) -> np.ndarray:
        """(N,) exit taken by :class:`~cafe_ray.inference.Threshold` (first max prob >= t).

        Compared in float32, as torch compares a float32 tensor with a Python float."""
        hit = self.confidence[:, :-1, 0] >= np.float32(threshold)  # (N, m-1)
        return np.where(hit.any(axis=1), hit.argmax(axis=1), self.num_exits - 1)

    def mean_macs(self, exits: np.ndarray) -> float:
        return float(self.exit_macs[exits].mean())

    def accuracy(self, exits: np.ndarray) -> float:
        return float(self.correct[np.arange(self.num_samples), exits].mean())

    # ----------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def from_model(cls, model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor, cost: ExitCost,
                   batch_size: int = 1024) -> ExitTrace:
        """Run every exit of ``model`` on ``x`` once (eval mode, in batches)."""
        if x.shape[0] == 0:
            raise ValueError("cannot trace an empty split (0 samples)")
        model.eval()
        chunks = []
        for i in range(0, x.shape[0], batch_size):
            outs = model(x[i : i + batch_size])  # m x (b, C)
            chunks.append(torch.stack(outs, dim=1).float())  # (b, m, C)
        return cls(torch.cat(chunks).numpy(), y.numpy(), np.asarray(cost.cascade))

    @classmethod
    def from_run(cls, run: RunArtifacts, client_id: int, split: str = "val") -> ExitTrace:
        """Client ``client_id``'s personal model on its ``split`` of a finished run."""
        x, y = run.client_data(client_id, split)
        return cls.from_model(run.client_model(client_id), x, y, run.exit_cost)

    @staticmethod
    def concat(traces: Sequence[ExitTrace]) -> ExitTrace:
        """Pool traces of the same architecture (e.g. every client of a run)."""
        if not traces:
            raise ValueError("concat: no traces given")
        first = traces[0]
        for t in traces[1:]:
            if t.logits.shape[1:] != first.logits.shape[1:] or not np.array_equal(t.exit_macs, first.exit_macs):
                raise ValueError(f"concat: traces differ in exits/classes/MACs ({t.logits.shape[1:]} "
                                 f"{t.exit_macs.tolist()} vs {first.logits.shape[1:]} {first.exit_macs.tolist()})")
        return ExitTrace(np.concatenate([t.logits for t in traces]), np.concatenate([t.labels for t in traces]),
                         first.exit_macs)
