"""The in-memory dataset contract shared by loaders, partitioners and the Ray layer.

A dataset is a handful of contiguous numpy arrays so that the Ray layer can put
it in the object store once (zero-copy) and a client is just index lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset is missing; the message names every path tried and how to get it."""


@dataclass(frozen=True)
class ArrayDataset:
    name: str
    x_train: np.ndarray  # float32 (N, C, H, W) for images, int64 (N, L) token ids for text
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray  # same layout as x_train
    y_test: np.ndarray  # int64 (M,)
    num_classes: int
    classes: tuple[str, ...] = ()  # human-readable class names, when known
    # the natural partition (data.client): client index 0..n-1 of every train / test sample
    train_client: np.ndarray | None = field(default=None, repr=False, compare=False)
    test_client: np.ndarray | None = field(default=None, repr=False, compare=False)
    # what the loader measured and applied (parquet: the training split's standardisation
    # statistics); a run stores it in data_stats.json
    stats: dict | None = field(default=None, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_text(self) -> bool:
        return self.x_train.dtype == np.int64


@dataclass(frozen=True)
class ClientSplit:
    """One client's data: indices into the dataset's train and test arrays."""

    client_id: int
    train_idx: np.ndarray  # int64 indices into x_train
    test_idx: np.ndarray  # int64 indices into x_test; follows the client's label distribution
    # int64 indices into x_train, carved out of the client's training data (data.val_fraction):
    # every tuning choice and calibration reads it, so the test split stays for the final table
    val_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


class ClientSplits(Sequence[ClientSplit]):
    """Every client's split in four flat arrays (CSR): O(1) Python objects, not O(clients).

    ``splits[i]`` is client i's :class:`ClientSplit` (views, no copy). A million
    clients are four numpy arrays that go to the Ray object store zero-copy and to
    ``splits.npz`` in one write, instead of a million Python objects.
    """

    def __init__(self, train_ptr: np.ndarray, train_idx: np.ndarray, test_ptr: np.ndarray,
                 test_idx: np.ndarray, val_ptr: np.ndarray | None = None,
                 val_idx: np.ndarray | None = None) -> None:
        self.train_ptr = np.asarray(train_ptr, dtype=np.int64)
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.test_ptr = np.asarray(test_ptr, dtype=np.int64)
        self.test_idx = np.asarray(test_idx, dtype=np.int64)
        self.val_ptr = (np.zeros_like(self.train_ptr) if val_ptr is None
                        else np.asarray(val_ptr, dtype=np.int64))
        self.val_idx = np.zeros(0, np.int64) if val_idx is None else np.asarray(val_idx, dtype=np.int64)
        if not len(self.train_ptr) == len(self.test_ptr) == len(self.val_ptr) or len(self.train_ptr) < 1:
            raise ValueError("ClientSplits: train_ptr, test_ptr and val_ptr need one entry per client plus one")

    @classmethod
    def from_list(cls, splits: Sequence[ClientSplit]) -> ClientSplits:
        """From per-client splits with ids 0..n-1 (any order)."""
        ordered = sorted(splits, key=lambda s: s.client_id)
        if [s.client_id for s in ordered] != list(range(len(ordered))):
            raise ValueError("ClientSplits.from_list: client ids must be 0..n-1")

        def csr(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            ptr = np.zeros(len(parts) + 1, dtype=np.int64)
            ptr[1:] = np.cumsum([len(p) for p in parts])
            flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
            return ptr, flat

        return cls(*csr([s.train_idx for s in ordered]), *csr([s.test_idx for s in ordered]),
                   *csr([s.val_idx for s in ordered]))

    def __len__(self) -> int:
        return len(self.train_ptr) - 1

    def __getitem__(self, i: int) -> ClientSplit:  # type: ignore[override]  # ints only, no slices
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"client {i} is not in this split (clients 0..{n - 1})")
        tr, te, va = self.train_ptr, self.test_ptr, self.val_ptr
        return ClientSplit(i, self.train_idx[tr[i]:tr[i + 1]], self.test_idx[te[i]:te[i + 1]],
                           self.val_idx[va[i]:va[i + 1]])

    def __iter__(self) -> Iterator[ClientSplit]:
        return (self[i] for i in range(len(self)))

    def train_sizes(self) -> np.ndarray:
        return np.diff(self.train_ptr)

    def test_sizes(self) -> np.ndarray:
        return np.diff(self.test_ptr)
