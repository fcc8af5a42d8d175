"""Early-exit network (EEN) base: backbone stages B_1..B_m and exit heads E_1..E_m.

Exit m (the last) is the teacher in CAFEDistill (arXiv:2601.10015); its head is a
single linear layer on the last-stage feature phi(x), so that a teacher logit is
z_j(x) = phi(x)^T h_j and a weighted mix of teachers is one aggregated head.
Exit *policies* live outside the model (cafe_ray.inference).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

BACKBONE_PREFIX = "stages."
EXIT_PREFIX = "exits."


class LastExitHead(nn.Module):
    """Parameter-free feature map phi(.) followed by one linear layer (the teacher head)."""

    def __init__(self, feature: nn.Module, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.feature = feature  # must hold no parameters: phi belongs to the backbone
        self.linear = nn.Linear(in_features, num_classes)
        if any(True for _ in self.feature.parameters()):
            raise ValueError("LastExitHead.feature must be parameter-free (phi(x) is backbone)")

    def phi(self, h: torch.Tensor) -> torch.Tensor:
        return self.feature(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.feature(h))


class EarlyExitNet(nn.Module):
    """m stages, one exit head after each; ``forward`` returns every exit's logits.

    Parameter names: ``stages.{k}.*`` is the shared backbone, ``exits.{k}.*`` is the
    head of exit k (0-based). The last head is a :class:`LastExitHead`.
    """

    def __init__(self, stages: list[nn.Module], exits: list[nn.Module], num_classes: int) -> None:
        super().__init__()
        if len(stages) != len(exits) or len(stages) < 2:
            raise ValueError(f"need m >= 2 stages and one exit per stage, got {len(stages)} stages and {len(exits)} exits")
        if not isinstance(exits[-1], LastExitHead):
            raise ValueError("the last exit must be a LastExitHead (linear on phi(x))")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.num_classes = num_classes

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits: list[torch.Tensor] = []
        h = x
        for stage, head in zip(self.stages, self.exits, strict=True):
            h = stage(h)
            logits.append(head(h))  # (B, num_classes)
        return logits

    def forward_until(self, x: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Logits of exits 0..k only; stages after k are never run."""
        if not 0 <= k < self.num_exits:
            raise ValueError(f"exit index k={k} out of range [0, {self.num_exits - 1}]")
        logits: list[torch.Tensor] = []
        h = x
        for i in range(k + 1):
            h = self.stages[i](h)
            logits.append(self.exits[i](h))
        return logits

    def forward_with_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All exit logits plus phi(x), the last-stage feature the teacher head reads."""
        logits: list[torch.Tensor] = []
        h = x
        for stage, head in zip(self.stages[:-1], self.exits[:-1], strict=True):
            h = stage(h)
            logits.append(head(h))
        h = self.stages[-1](h)
        last = self.last_exit
        feat = last.phi(h)  # (B, D)
        logits.append(last.linear(feat))
        return logits, feat

    @property
    def last_exit(self) -> LastExitHead:
        """The last exit (the constructor requires a LastExitHead there)."""
        return cast(LastExitHead, self.exits[-1])

    @property
    def last_head(self) -> nn.Linear:
        return self.last_exit.linear

    # ------------------------------------------------------------ parameter split
    def backbone_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith(BACKBONE_PREFIX)]

    def head_keys(self, k: int) -> list[str]:
        prefix = f"{EXIT_PREFIX}{k}."
        return [n for n in self.state_dict() if n.startswith(prefix)]

    def stage_keys(self, k: int) -> list[str]:
        prefix = f"{BACKBONE_PREFIX}{k}."
        return [n for n in self.state_dict() if n.startswith(prefix)]


def exit_of_key(key: str) -> int | None:
    """The exit index of an ``exits.{k}.*`` key, else None."""
    if not key.startswith(EXIT_PREFIX):
        return None
    return int(key[len(EXIT_PREFIX) :].split(".", 1)[0])


def stage_of_key(key: str) -> int | None:
    """The stage index of a ``stages.{k}.*`` key, else None."""
    if not key.startswith(BACKBONE_PREFIX):
        return None
    return int(key[len(BACKBONE_PREFIX) :].split(".", 1)[0])
