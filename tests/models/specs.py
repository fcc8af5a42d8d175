"""Small instances of every zoo model (tiny widths and inputs: the tests run on 2 shared cores)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cafe_ray.config import ModelConfig
from cafe_ray.models import EarlyExitNet, build_model


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: str
    shape: tuple[int, ...]
    classes: int
    width: int
    vocab: int | None = None
    exits: int = 3

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.vocab else torch.float32

    def build(self, seed: int = 0) -> EarlyExitNet:
        torch.manual_seed(seed)
        cfg = ModelConfig(name=self.name, width=self.width)
        return build_model(cfg, self.dataset, self.shape, self.classes, vocab_size=self.vocab)

    def batch(self, n: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.vocab:
            x = torch.randint(1, self.vocab, (n, *self.shape), generator=g)  # (n, L)
            x[-1, self.shape[0] // 2 :] = 0  # last row: second half is padding
            return x
        return torch.randn((n, *self.shape), generator=g)  # (n, C, H, W)


SPECS = [
    Spec("cnn_small", "digits", (1, 8, 8), 10, 8),
    Spec("cnn_small", "fashion_mnist", (1, 28, 28), 10, 8),
    Spec("conv3", "cifar10", (3, 32, 32), 10, 8),
    Spec("resnet18_ee", "cifar100", (3, 32, 32), 100, 8, exits=4),
    Spec("transformer4", "agnews", (16,), 4, 32, vocab=100, exits=4),
]
IDS = [f"{s.name}-{s.dataset}" for s in SPECS]
