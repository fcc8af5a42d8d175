"""A cohort of C same-architecture clients as one ordinary, C-times-wider network.

Why: batching the clients with ``torch.func.vmap`` adds a per-step transform cost that
a one-local-step round never earns back, and vmap's batching rules turn convolutions
into a loop or an unfolding. Widening keeps plain modules and plain autograd:

- ``Conv2d(cin, cout, groups=g)`` becomes ``Conv2d(C*cin, C*cout, groups=C*g)``: one
  grouped convolution whose group ``c`` sees only client ``c``'s channels;
- ``GroupNorm(g, ch)`` becomes ``GroupNorm(C*g, C*ch)`` (groups never straddle clients);
- ``Linear`` becomes :class:`CohortLinear` (one batched matrix product, weights ``(C, out, in)``);
- parameter-free modules that act per sample and per channel (ReLU, pooling, flatten,
  residual additions) run unchanged.

Activations are laid out ``(B, C*features, ...)``: client ``c`` owns the ``c``-th block
of channels (of features, after a flatten), so a client's samples never meet another
client's weights. Every parameter is the clients' parameters stacked along a new first
dimension and reshaped (a view), so client ``c``'s tensors are ``wide.view(C, *shape)[c]``.

Any other module with parameters (LayerNorm, attention, embeddings, BatchNorm) cannot be
widened; :func:`widen` says which. A model that widens is still checked once on random
inputs against the per-client forward (:func:`check_wide`), so a custom parameter-free
module that mixes channels is caught, not trained wrongly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from cafe_ray.algorithms.base import CohortOutputs
from cafe_ray.algorithms.heads import final_linear_name
from cafe_ray.models.base import EarlyExitNet

Params = dict[str, torch.Tensor]

# Parameter-free modules that act per sample and per channel, so they run unchanged on the
# (B, C*channels, ...) layout. Containers are walked; their own forward only wires children.
_PER_CHANNEL: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)


class CohortLinear(nn.Module):
    """C independent ``Linear(in, out)`` layers on ``(B, C*in)`` -> ``(B, C*out)``."""

    def __init__(self, cohort: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.cohort, self.in_features, self.out_features = cohort, in_features, out_features
        self.weight = nn.Parameter(torch.empty(cohort, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(cohort, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        z = torch.bmm(x.reshape(B, self.cohort, self.in_features).transpose(0, 1),
                      self.weight.transpose(1, 2))  # (C, B, out)
        if self.bias is not None:
            z = z + self.bias.unsqueeze(1)
        return z.transpose(0, 1).reshape(B, self.cohort * self.out_features)


def _wide_module(m: nn.Module, C: int) -> nn.Module | None:
    """The C-wide replacement of a module that holds parameters, None if it cannot widen."""
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return nn.Conv2d(C * m.in_channels, C * m.out_channels, m.kernel_size, m.stride,  # type: ignore[arg-type]
                         m.padding, m.dilation, C * m.groups, bias=m.bias is not None)  # type: ignore[arg-type]
    if type(m) is nn.GroupNorm:
        return nn.GroupNorm(C * m.num_groups, C * m.num_channels, m.eps, m.affine)
    if type(m) is nn.Linear:
        return CohortLinear(C, m.in_features, m.out_features, m.bias is not None)
    return None


def widen(model: EarlyExitNet, cohort: int) -> tuple[EarlyExitNet | None, str | None]:
    """(the C-wide copy of ``model``, None) or (None, why it cannot widen)."""
    if any(True for _ in model.buffers()):
        return None, "the model has buffers, which a cohort would share"
    wide = copy.deepcopy(model)
    for name, m in list(wide.named_modules()):
        if not name:
            continue
        if any(True for _ in m.parameters(recurse=False)):
            new = _wide_module(m, cohort)
            if new is None:
                return None, f"{name} ({type(m).__name__}) has no grouped form"
            parent, _, attr = name.rpartition(".")
            setattr(wide.get_submodule(parent) if parent else wide, attr, new.to(next(m.parameters()).device))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return None, f"{name} flattens dims {m.start_dim}..{m.end_dim}, not all but the batch"
        elif not isinstance(m, _PER_CHANNEL) and not any(True for _ in m.children()):
            return None, f"{name} ({type(m).__name__}) is not known to act per channel"
    return wide, None


def load_cohort(wide: nn.Module, starts: Sequence[Params]) -> None:
    """Write the clients' parameters into the wide model (stacked, reshaped)."""
    with torch.no_grad():
        for n, p in wide.named_parameters():
            p.copy_(torch.stack([s[n] for s in starts]).reshape(p.shape))


def client_params(wide: nn.Module, shapes: dict[str, torch.Size], c: int, cohort: int) -> Params:
    """Client ``c``'s parameters (copies) out of the C-wide model (``shapes``: the model's own)."""
    return {n: p.detach().view(cohort, *shapes[n])[c].clone() for n, p in wide.named_parameters()}


def wide_input(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-client batches (B, *feat) -> (B, C*feat[0], *feat[1:]) (clients' channel blocks)."""
    return torch.stack(list(xs), dim=1).flatten(1, 2)


def wide_logits(z: torch.Tensor, cohort: int) -> torch.Tensor:
    """(B, C*K) -> (B, C, K)."""
    return z.view(z.shape[0], cohort, -1)


def check_wide(model: EarlyExitNet, wide: EarlyExitNet, starts: Sequence[Params], x: torch.Tensor,
               rtol: float = 1e-4) -> str | None:
    """None if the wide forward equals each client's own forward on ``x``, else what differs."""
    C = len(starts)
    probe = copy.deepcopy(model)
    load_cohort(wide, starts)
    with torch.no_grad():
        got = [wide_logits(z, C) for z in wide(wide_input([x] * C))]
        for c, s in enumerate(starts):
            probe.load_state_dict(s)
            for k, z in enumerate(probe(x)):
                err = float((got[k][:, c] - z).abs().max())
                if not err <= rtol * (1.0 + float(z.abs().max())):
                    return f"exit {k} of client {c} differs by {err:.2e} from the model's own forward"
    return None


class WideProbe:
    """The wide network's forward as :class:`CohortOutputs`: every exit's logits (B, C, K) and,
    where every exit ends in its linear layer, that layer's input f_k (B, C, D) and live
    weights (what FedRoD's residual heads read). Hooks live only for one forward."""

    def __init__(self, model: EarlyExitNet, wide: EarlyExitNet, cohort: int) -> None:
        self.wide, self.cohort = wide, cohort
        try:
            names = [final_linear_name(h) for h in model.exits]
        except ValueError:  # a head without a linear layer: logits only
            names = []
        self.linears = [wide.exits[k].get_submodule(n) for k, n in enumerate(names)]

    def __call__(self, x: torch.Tensor) -> CohortOutputs:
        C = self.cohort
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [lin.register_forward_hook(lambda _m, inp, out, k=k: captured.__setitem__(k, (inp[0], out)))
                 for k, lin in enumerate(self.linears)]
        try:
            zs = self.wide(x)
        finally:
            for h in hooks:
                h.remove()
        feats: list[torch.Tensor] = []
        heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k, z in enumerate(zs):
            if k in captured and captured[k][1] is z:  # the head returns its linear's output
                f = captured[k][0]
                feats.append(f.reshape(f.shape[0], C, -1))
                lin = self.linears[k]
                heads.append((cast(torch.Tensor, lin.weight), cast(torch.Tensor, lin.bias)))
        if len(feats) != len(zs):
            feats, heads = [], []
        return CohortOutputs([wide_logits(z, C) for z in zs], feats, heads)
