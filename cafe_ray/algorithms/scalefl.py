"""ScaleFL: width- and depth-scaled sub-models with self-distillation from the deepest exit.

Ilhan, Su, Liu, "ScaleFL: Resource-Adaptive Federated Learning with
Heterogeneous Clients", CVPR 2023, pp. 24532-24541. Reference code:
github.com/git-disl/scale-fl.

As defined in docs/specification.md (Baselines): client i trains a sub-model
scaled by its device profile, depth k = ``max_depth`` (first k stages and their
exits; None = all) and width int(width * ``width_factor``) built by
:func:`cafe_ray.models.build_model`, whose tensors are prefix slices of the
global model's (the first channels of every layer); the loss is
    sum_{e<k} w_e [ CE(y, z_e) + gamma * T^2 KL(softmax(z_{k-1}/T) || softmax(z_e/T)) ]
(no KD term for the deepest trained exit e = k-1, the detached teacher), with
w_e = e + 1 rescaled to mean 1 (``scalefl.depth_weighted``; ScaleFL weights
exit e by e+1), gamma = ``kd_weight`` from round ``kd_start`` * T on (ScaleFL
turns KD on after 25% of the rounds), T = ``temperature``. The server averages
every element over the clients holding it (HeteroFL-style,
:mod:`cafe_ray.algorithms.submodel`).

Decisions (documented): the teacher logits are detached (the reference lets the
KL gradient reach the deepest exit) and KL is the batch mean (the reference's
``nn.KLDivLoss()`` also divides by the class count); aggregation is
sample-weighted like every other algorithm here (the reference counts clients).

GroupNorm and prefix slicing: ``group_norm`` picks the group count from the
channel count, so a narrower model can group channels differently (conv3 at
width 32: 128 channels in 32 groups of 4, but 64 channels in 32 groups of 2).
The sub-model's GroupNorms are therefore re-grouped to the global model's
channels-per-group, so its groups are exactly the first groups of the global
layer and a sliced sub-model computes what the global model computes on those
channels. Widths whose channel counts are not multiples of the global group
size are skipped: the largest compatible width <= int(width * factor) is used
(the full width if none). Width scaling needs a CNN (cnn_small, conv3,
resnet18_ee): transformer4's fused qkv projection and attention heads do not
slice by prefix.

The virtual clock charges ``trained_depth`` = k at the full width's MACs (the
simulation's cost model is per depth); evaluation runs the global model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cafe_ray.algorithms.base import ClientContext, ClientData, register
from cafe_ray.algorithms.cafedistill.loss import kd_term
from cafe_ray.algorithms.submodel import SubModelFL, depth_of, prefix_index
from cafe_ray.algorithms.training import LossFn
from cafe_ray.config import ExperimentConfig
from cafe_ray.models.base import EarlyExitNet
from cafe_ray.models.inputs import TEXT_MODELS, resolve_model_name
from cafe_ray.models.zoo import build_model


def align_group_norms(sub: nn.Module, full: nn.Module) -> bool:
    """Give every GroupNorm of ``sub`` the channels-per-group of the same layer in ``full``.

    Returns False (and leaves the rest unchanged) when a layer's channel count is
    not a multiple of the global group size, i.e. no prefix of whole groups.
    """
    for name, mod in sub.named_modules():
        if not isinstance(mod, nn.GroupNorm):
            continue
        ref = full.get_submodule(name)
        if not isinstance(ref, nn.GroupNorm):
            raise ValueError(f"{name}: GroupNorm in the sub-model but {type(ref).__name__} in the global model")
        group_size = ref.num_channels // ref.num_groups
        if mod.num_channels % group_size:
            return False
        mod.num_groups = mod.num_channels // group_size
    return True


def is_prefix_model(sub: nn.Module, full: nn.Module) -> bool:
    """Same keys, and every tensor of ``sub`` a prefix slice of ``full``'s."""
    a, b = sub.state_dict(), full.state_dict()
    if a.keys() != b.keys():
        return False
    try:
        for k, v in a.items():
            prefix_index(v.shape, b[k].shape)
    except ValueError:
        return False
    return True


def build_scaled(cfg: ExperimentConfig, width: int, input_shape: tuple[int, ...], num_classes: int) -> EarlyExitNet:
    """The configured architecture at ``width`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the weights are overwritten by the global slice
        return build_model(cfg.model.model_copy(update={"width": width}), cfg.data.name, input_shape, num_classes)


def scalefl_loss(
    logits: Sequence[torch.Tensor], y: torch.Tensor, kd_weight: float, temperature: float, depth_weighted: bool
) -> torch.Tensor:
    """sum_e w_e [CE(y, z_e) + kd_weight * KD(z_e <- z_last)], KD only for e < last; w mean 1."""
    k = len(logits)
    raw = [float(e + 1) for e in range(k)] if depth_weighted else [1.0] * k
    w = [r * k / sum(raw) for r in raw]
    teacher = logits[-1]
    loss = w[-1] * F.cross_entropy(teacher, y)
    for e in range(k - 1):
        term = F.cross_entropy(logits[e], y)
        if kd_weight:
            term = term + kd_weight * kd_term(logits[e], teacher, temperature)
        loss = loss + w[e] * term
    return loss


@register
class ScaleFL(SubModelFL):
    """ScaleFL (CVPR 2023): width x depth sub-models, KD from the deepest exit, per-element mean."""

    name = "scalefl"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self._widths: dict[tuple[float, tuple[int, ...]], int] = {}  # (factor, input shape) -> width

    def scaled_model(
        self, model: EarlyExitNet, factor: float, input_shape: tuple[int, ...]
    ) -> tuple[EarlyExitNet, int]:
        """(sub-model, width): the widest prefix-compatible width <= int(width * factor)."""
        full_w = self.cfg.model.width
        name = resolve_model_name(self.cfg.model.name, self.cfg.data.name, input_shape)
        if name in TEXT_MODELS:
            raise ValueError(
                f"scalefl: width_factor={factor} < 1 needs a CNN (cnn_small, conv3, resnet18_ee); {name}'s fused "
                "qkv projection and attention heads do not slice by prefix. Use width_factor 1.0 in the device "
                "profiles, or algorithm.name=depthfl"
            )
        key = (factor, input_shape)
        cached = self._widths.get(key)
        candidates = [cached] if cached is not None else list(range(max(1, int(full_w * factor)), 0, -1))
        for w in candidates:
            if w >= full_w:
                break
            # built on the full model's device: the client trains where its runner put the model
            net = build_scaled(self.cfg, w, input_shape, model.num_classes).to(next(model.parameters()).device)
            if align_group_norms(net, model) and is_prefix_model(net, model):
                self._widths[key] = w
                return net, w
        self._widths[key] = full_w
        return model, full_w

    def submodel(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[EarlyExitNet, int, int]:
        factor = float(ctx.width_factor)
        if not 0 < factor <= 1:
            raise ValueError(f"width_factor must be in (0, 1], got {factor}; set it in the device profile")
        depth = depth_of(ctx.max_depth, model.num_exits)
        if factor == 1.0:
            return model, self.cfg.model.width, depth
        net, width = self.scaled_model(model, factor, tuple(int(s) for s in data.x_train.shape[1:]))
        return net, width, depth

    def loss_fn(self, depth: int, ctx: ClientContext) -> LossFn:
        hp = self.cfg.algorithm.scalefl
        kd_on = ctx.round >= hp.kd_start * ctx.num_rounds
        gamma = hp.kd_weight if kd_on else 0.0

        def loss(model: EarlyExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return scalefl_loss(model.forward_until(x, depth - 1), y, gamma, hp.temperature, hp.depth_weighted)

        return loss
