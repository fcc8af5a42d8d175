"""Plain SGD (momentum, weight decay), the update of ``torch.optim.SGD`` bit for bit.

Why not ``torch.optim.SGD``: constructing the first torch optimizer imports
``torch._dynamo`` (about 1 s of CPU per process, 1-3 s on a busy 2-core machine),
which every client actor paid in round 0. The local loop needs none of what that
import buys, so it steps with this one; a test checks that both produce the same
parameters bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` with dampening 0, no Nesterov.

    Parameters whose ``.grad`` is None are skipped that step (as torch does).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum, weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._bufs: list[torch.Tensor | None] = [None] * len(self.params)

    @property
    def momentum_buffers(self) -> list[torch.Tensor | None]:
        """Each parameter's momentum buffer (None before its first step or without momentum)."""
        return self._bufs

    def zero_grad(self) -> None:
        """Drop the gradients (torch's default, ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self._bufs[i]
                if buf is None:
                    buf = self._bufs[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            p.add_(grad, alpha=-self.lr)
