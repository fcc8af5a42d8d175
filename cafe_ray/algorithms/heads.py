"""Exit-head anatomy shared by FedRoD-EE and FedPAC-EE.

Every zoo exit head ends in one ``nn.Linear``: E_k(h) = W_k f_k(h) + b_k. For the
small CNNs and MLP heads f_k is parameter-free pooling of the stage output (so
f_k(h) is a backbone feature); for resnet18_ee's conv heads and transformer4's
LayerNorm heads f_k is the head's own trunk. FedRoD's personal head and FedPAC's
prototypes act on f_k(h), the input of that final linear layer, which
:class:`HeadProbe` captures with forward hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from cafe_ray.models.base import EXIT_PREFIX, EarlyExitNet


def final_linear_name(head: nn.Module) -> str:
    """Name (relative to ``head``) of its last ``nn.Linear``; "" when the head is one."""
    names = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"exit head {type(head).__name__} has no nn.Linear; FedRoD/FedPAC need a linear last layer")
    return names[-1]


def final_linear_keys(model: EarlyExitNet, k: int) -> tuple[str, str]:
    """State-dict keys (weight, bias) of exit k's final linear layer."""
    name = final_linear_name(model.exits[k])
    prefix = f"{EXIT_PREFIX}{k}." + (f"{name}." if name else "")
    lin = model.exits[k].get_submodule(name)
    if lin.bias is None:
        raise ValueError(f"exit {k}: the final nn.Linear has no bias; FedRoD/FedPAC need bias=True")
    return prefix + "weight", prefix + "bias"


class HeadProbe:
    """Exit logits z_k together with f_k, the input of exit k's final linear layer.

    The probe checks that each head *returns* its final linear's output (the same
    tensor object), so a head that post-processes its logits fails loudly
    instead of giving wrong features.
    """

    def __init__(self, model: EarlyExitNet) -> None:
        self.model = model
        self.linears: list[nn.Linear] = [
            model.exits[k].get_submodule(final_linear_name(model.exits[k])) for k in range(model.num_exits)
        ]

    def __call__(self, x: torch.Tensor, depth: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(logits, features) of exits 0..depth-1 (all exits when depth is None)."""
        depth = self.model.num_exits if depth is None else depth
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            lin.register_forward_hook(lambda _m, inp, out, k=k: captured.__setitem__(k, (inp[0], out)))
            for k, lin in enumerate(self.linears[:depth])
        ]
        try:
            logits = self.model.forward_until(x, depth - 1)
        finally:
            for h in hooks:
                h.remove()
        feats: list[torch.Tensor] = []
        for k, z in enumerate(logits):
            f, out = captured[k]
            if out is not z:
                raise ValueError(
                    f"exit {k}: the head's output is not its last nn.Linear's output; "
                    "FedRoD/FedPAC need heads that end in that linear layer"
                )
            feats.append(f)  # (B, D_k)
        return logits, feats


PRIOR_FLOOR = 1e-4  # a class the client never saw gets a log prior of log(1e-4), not -inf


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """log of the client's label prior from its class counts, floored at PRIOR_FLOOR: (C,)."""
    prior = counts.to(torch.float32) / counts.sum().clamp_min(1.0)
    return prior.clamp_min(PRIOR_FLOOR).log()


@torch.no_grad()
def add_log_prior_to_heads(model: EarlyExitNet, counts: torch.Tensor) -> None:
    """Every exit's final bias += log prior: a new client's heads start with its Bayes correction.

    The same initialisation CAFEDistill's residual heads and FedRoD-EE's
    ``personal_init: prior`` use, for methods whose exit heads are personal outright.
    """
    shift = log_prior(counts)
    for k in range(model.num_exits):
        lin = model.exits[k].get_submodule(final_linear_name(model.exits[k]))
        if lin.bias is None:
            raise ValueError(f"exit {k}: head_init=prior needs a final nn.Linear with bias=True")
        lin.bias.add_(shift.to(lin.bias.dtype))

