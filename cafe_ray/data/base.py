"""The in-memory dataset contract shared by loaders, partitioners and the Ray layer.

A dataset is a handful of contiguous numpy arrays so that the Ray layer can put
it in the object store once (zero-copy) and a client is just index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

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
