"""Hand-checkable early-exit models and one tiny trained run per test session."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cafe_ray.models import EarlyExitNet, ExitCost, LastExitHead

# Hand-made per-exit cost: stages 100/200/300 MACs, heads 10/20/30.
# Cascade (every stage and head up to exit k): 110, 330, 660.
HAND_COST = ExitCost.from_parts([100, 200, 300], [10, 20, 30])
HAND_CASCADE = [110, 330, 660]


class _Slice(nn.Module):
    """Parameter-free: the k-th block of C features of the input (a head that *is* its logits)."""

    def __init__(self, k: int, c: int) -> None:
        super().__init__()
        self.k, self.c = k, c

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, self.k * self.c : (self.k + 1) * self.c]


def sliced_een(num_exits: int, num_classes: int) -> EarlyExitNet:
    """An EEN whose exit k outputs x[:, k*C:(k+1)*C]: feed it (N, m*C) and every logit is known."""
    m, c = num_exits, num_classes
    last = LastExitHead(_Slice(m - 1, c), c, c)
    with torch.no_grad():
        last.linear.weight.copy_(torch.eye(c))
        last.linear.bias.zero_()
    exits: list[nn.Module] = [_Slice(k, c) for k in range(m - 1)]
    return EarlyExitNet([nn.Identity() for _ in range(m)], [*exits, last], c).eval()


def as_input(logits: torch.Tensor) -> torch.Tensor:
    """(N, m, C) logits -> the (N, m*C) input of :func:`sliced_een`."""
    return logits.reshape(logits.shape[0], -1).float()


# Three samples, three exits, three classes. Max softmax probability per exit, rounded:
#   sample 0 (label 0): 0.909 (class 0), 0.909 (class 1), 0.787 (class 2)
#   sample 1 (label 2): 0.333 (tie),     0.909 (class 1), 0.987 (class 2)
#   sample 2 (label 2): 0.452 (class 0), 0.452 (class 1), 0.909 (class 2)
# Threshold 0.6 -> exits 0, 1, 2; correct, wrong, correct; MACs 110, 330, 660.
HAND_LOGITS = torch.tensor([
    [[4.0, 1.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]],
    [[0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]],
    [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 3.0]],
])
HAND_LABELS = torch.tensor([0, 2, 2])


_RUNS: dict[tuple[str, ...], Path] = {}


def tiny_run(tmp_root: Path, algorithm: str, *sets: str) -> Path:
    """One tiny trained run per (algorithm, overrides) per session (sequential executor: no Ray, ~4 s)."""
    key = (algorithm, *sets)
    if key not in _RUNS:
        from cafe_ray.sim.engine import run_simulation
        from tests.sim.conftest import tiny_cfg

        cfg = tiny_cfg(tmp_root / "-".join(key).replace("=", "_"), f"algorithm.name={algorithm}",
                       "round.num_rounds=3", *sets, executor="sequential")
        _RUNS[key], _ = run_simulation(cfg, show_progress=False)
    return _RUNS[key]
