"""The early-exit model zoo: four architectures built on :class:`EarlyExitNet`.

Every builder returns an ``EarlyExitNet`` whose backbone parameters are ``stages.{k}.*`` and
whose exit heads are ``exits.{k}.*``; the last exit is a :class:`LastExitHead` (a
parameter-free ``phi`` + one linear layer) because CAFEDistill mixes teacher heads linearly.

Normalisation: GroupNorm / LayerNorm only, never BatchNorm. BatchNorm running statistics are
per-client buffers that FedAvg averages poorly under non-IID data and that make train and eval
behave differently; GroupNorm has neither problem and keeps the state_dict parameters-only.
This includes ``resnet18_ee``, which reuses torchvision's ``BasicBlock`` with a GroupNorm
``norm_layer`` (so the ``norm_layer`` deviation from torchvision's ResNet-18 is deliberate).

Builders do not seed: :func:`make_model` (what a run builds) seeds the RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cafe_ray.config import ExperimentConfig, ModelConfig, plugin_target
from cafe_ray.models.base import BACKBONE_PREFIX, EarlyExitNet, LastExitHead
from cafe_ray.models.inputs import MODEL_NAMES, check_image_shape, check_inputs

if TYPE_CHECKING:
    from cafe_ray.data.base import ArrayDataset

# ------------------------------------------------------------------------ helpers
def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups <= 32 that keeps >= 2 channels per group.

    Why: a fixed 32 groups fails for narrow test widths (e.g. 8 channels); this degrades to
    fewer groups instead, and to LayerNorm-like behaviour (1 group) for tiny widths.
    """
    cap = max(1, min(32, channels // 2))
    groups = max(g for g in range(1, cap + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class MaxPool2x2(nn.MaxPool2d):
    """2x2 max-pool, stride 2, exactly ``nn.MaxPool2d(2)``.

    Without autograd (evaluation, serving: ``torch.no_grad``/``inference_mode``) it is two
    elementwise maxima over strided views: the same values, NaN included, about 20x faster on
    CPU than the pooling kernel, which made the first stage's pool 70% of a 28x28 model's
    stage time (docs/serving.md). With autograd on, the pooling kernel runs, so training's
    gradients (one winner per window) are unchanged.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dim() not in (3, 4):
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, as the kernel: odd edges dropped
        v = x[..., :h, :w]
        rows = torch.maximum(v[..., 0::2, :], v[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU (+ 2x2 max-pool): the unit of cnn_small and conv3."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(MaxPool2x2())
    return nn.Sequential(*layers)


def _pool_head(channels: int, num_classes: int, grid: int = 2) -> nn.Sequential:
    """Shallow exit: average-pool to grid x grid, flatten, one linear layer (cheap, keeps coarse layout)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(grid),  # (B, C, grid, grid)
        nn.Flatten(),  # (B, C * grid * grid)
        nn.Linear(channels * grid * grid, num_classes),  # (B, K)
    )


def _last_image_head(channels: int, num_classes: int, grid: int = 1) -> LastExitHead:
    """Teacher head: phi = average pool to grid x grid + flatten (parameter-free), then linear.

    The small CNNs use grid=2 like their shallow heads: a global pool would give the
    deepest exit fewer features than the shallow ones and make it the weakest exit.
    """
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten())  # (B, C * grid * grid)
    return LastExitHead(pool, channels * grid * grid, num_classes)


# ---------------------------------------------------------------------- cnn_small
def cnn_small(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> EarlyExitNet:
    """3-exit CNN for 8x8 (digits) and 28x28 (Fashion-MNIST) inputs; cheap on CPU.

    Stages: conv(w) -> conv(2w) -> conv(2w), each 3x3 + GroupNorm + ReLU, with a 2x2 max-pool
    after a stage while the map is still >= 4 pixels (8x8: 8->4->2->2, 28x28: 28->14->7->3).
    Every head pools to 2x2 + linear (the last one's pooling is phi(x)).
    """
    c, h, w = check_image_shape("cnn_small", input_shape)
    chans = [width, 2 * width, 2 * width]
    stages: list[nn.Module] = []
    cin, side = c, min(h, w)
    for cout in chans:
        pool = side >= 4
        stages.append(_conv_block(cin, cout, pool))  # (B, cout, side', side')
        side = side // 2 if pool else side
        cin = cout
    exits: list[nn.Module] = [_pool_head(ch, num_classes) for ch in chans[:-1]]
    exits.append(_last_image_head(chans[-1], num_classes, grid=2))
    return EarlyExitNet(stages, exits, num_classes)


# -------------------------------------------------------------------------- conv3
def conv3(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> EarlyExitNet:
    """The CAFEDistill paper's "Conv3" for CIFAR-10: three conv layers, one exit after each.

    Stages: conv(w) -> conv(2w) -> conv(4w), each 3x3 + GroupNorm + ReLU + 2x2 max-pool
    (32x32: 32->16->8->4). Every head pools to 2x2 + linear (the last one's pooling is phi(x)).
    """
    c, _, _ = check_image_shape("conv3", input_shape)
    chans = [width, 2 * width, 4 * width]
    stages: list[nn.Module] = []
    cin = c
    for cout in chans:
        stages.append(_conv_block(cin, cout, pool=True))  # (B, cout, H/2^k, W/2^k)
        cin = cout
    exits: list[nn.Module] = [_pool_head(ch, num_classes) for ch in chans[:-1]]
    exits.append(_last_image_head(chans[-1], num_classes, grid=2))
    return EarlyExitNet(stages, exits, num_classes)


# -------------------------------------------------------------------- resnet18_ee
def _res_layer(inplanes: int, planes: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """Two torchvision BasicBlocks, as in ResNet._make_layer (projection shortcut when needed)."""
    # lazy: torchvision costs ~1.4 s of import that the other models never need
    from torchvision.models.resnet import BasicBlock, conv1x1

    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), norm(planes))
    return nn.Sequential(
        BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm),
        BasicBlock(planes, planes, norm_layer=norm),
    )


class _ConvPoolHead(nn.Module):
    """Shallow ResNet exit: 3x3 stride-2 conv to 2C channels + GN + ReLU, global pool, linear.

    Why a conv: a linear probe on early ResNet features is too weak to be a useful exit; one
    strided conv is the smallest head that adds capacity (and costs ~1/8 of the next stage).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        from torchvision.models.resnet import conv3x3

        self.conv = conv3x3(channels, 2 * channels, stride=2)
        self.norm = group_norm(2 * channels)
        self.linear = nn.Linear(2 * channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.norm(self.conv(h)))  # (B, 2C, H/2, W/2)
        z = z.mean(dim=(2, 3))  # (B, 2C)
        return self.linear(z)  # (B, K)


def resnet18_ee(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> EarlyExitNet:
    """ResNet-18 with 4 exits and a CIFAR stem, built from torchvision's BasicBlock.

    torchvision's ``resnet18()`` hard-codes 64/128/256/512 channels, so the layers are assembled
    here from ``torchvision.models.resnet.BasicBlock`` with channels w, 2w, 4w, 8w (width=64 is
    the standard ResNet-18). Stem: 3x3 conv stride 1, no max-pool. Norm: GroupNorm (see module
    docstring). Stages: stem+layer1, layer2, layer3, layer4 (32x32: 32, 16, 8, 4).
    """
    from torchvision.models.resnet import conv3x3

    c, _, _ = check_image_shape("resnet18_ee", input_shape)
    norm = group_norm
    chans = [width, 2 * width, 4 * width, 8 * width]
    stem = nn.Sequential(conv3x3(c, width), norm(width), nn.ReLU(inplace=True))  # (B, w, H, W)
    stages: list[nn.Module] = [nn.Sequential(stem, _res_layer(width, width, 1, norm))]  # (B, w, H, W)
    for k in range(1, 4):
        stages.append(_res_layer(chans[k - 1], chans[k], 2, norm))  # (B, chans[k], H/2^k, W/2^k)
    exits: list[nn.Module] = [_ConvPoolHead(ch, num_classes) for ch in chans[:-1]]
    exits.append(_last_image_head(chans[-1], num_classes))
    net = EarlyExitNet(stages, exits, num_classes)
    for m in net.modules():  # torchvision ResNet's init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


# ------------------------------------------------------------------- transformer4
# Token stages carry (hidden, keep) so that pooling can ignore padding (id 0):
# hidden (B, L, D) float, keep (B, L) bool (True = a real token).
TokenState = tuple[torch.Tensor, torch.Tensor]


class _Embed(nn.Module):
    """Token embedding + learned positions; also builds the padding mask from the ids."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        with torch.no_grad():
            self.tok.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> TokenState:
        ids = ids.long()  # (B, L)
        keep = ids != 0  # (B, L)
        keep = keep | ~keep.any(dim=1, keepdim=True)  # all-padding rows: attend to all (no NaN)
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, L, D)
        return h, keep


class _Block(nn.Module):
    """Pre-LN transformer encoder block (self-attention + 4x GELU MLP), padding-masked.

    Written out (instead of nn.TransformerEncoderLayer) so it never takes PyTorch's fused
    eval fast path, which FlopCounterMode cannot see; attention uses scaled_dot_product_attention.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"

    def forward(self, state: TokenState) -> TokenState:
        h, keep = state  # (B, L, D), (B, L)
        b, seq, d = h.shape
        qkv = self.qkv(self.norm1(h)).view(b, seq, 3, self.heads, d // self.heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        mask = keep[:, None, None, :]  # (B, 1, 1, L): key j visible iff real token
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        h = h + self.proj(a.transpose(1, 2).reshape(b, seq, d))  # (B, L, D)
        h = h + self.mlp(self.norm2(h))  # (B, L, D)
        return h, keep


class _FinalNorm(nn.Module):
    """LayerNorm at the end of stage 4, so the teacher feature phi stays parameter-free."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, state: TokenState) -> TokenState:
        h, keep = state
        return self.norm(h), keep  # (B, L, D)


class MaskedMeanPool(nn.Module):
    """Mean over real (non-padding) tokens: (B, L, D), (B, L) -> (B, D). Parameter-free."""

    def forward(self, state: TokenState) -> torch.Tensor:
        h, keep = state
        w = keep.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, D)


class _TokenHead(nn.Module):
    """Shallow transformer exit: masked mean pool + LayerNorm + linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.pool = MaskedMeanPool()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, state: TokenState) -> torch.Tensor:
        return self.linear(self.norm(self.pool(state)))  # (B, K)


def _num_heads(dim: int) -> int:
    """Most heads in (8, 4, 2) with head size >= 16 dividing dim, else 1."""
    for h in (8, 4, 2):
        if dim % h == 0 and dim // h >= 16:
            return h
    return 1


def transformer4(
    input_shape: tuple[int, ...], num_classes: int, width: int = 64, vocab_size: int = 20000
) -> EarlyExitNet:
    """4-block pre-LN transformer encoder for text classification (AG News), one exit per block.

    Input: int64 token ids (B, L), 0 = padding (masked in attention and pooling). Stage 1 is
    embedding + learned positions + block 1; stage 4 ends with the final LayerNorm so the teacher
    feature phi(x) = masked mean pool is parameter-free. Stages pass (hidden, keep-mask) tuples.
    """
    if len(input_shape) != 1:
        raise ValueError(f"model.name='transformer4' needs token inputs of shape (seq_len,), got {tuple(input_shape)}")
    if vocab_size is None or vocab_size < 2:
        raise ValueError(f"model.name='transformer4' needs vocab_size >= 2, got {vocab_size}")
    seq_len = int(input_shape[0])
    heads = _num_heads(width)
    stages: list[nn.Module] = [nn.Sequential(_Embed(vocab_size, seq_len, width), _Block(width, heads))]
    stages += [_Block(width, heads) for _ in range(2)]
    stages.append(nn.Sequential(_Block(width, heads), _FinalNorm(width)))
    exits: list[nn.Module] = [_TokenHead(width, num_classes) for _ in range(3)]
    exits.append(LastExitHead(MaskedMeanPool(), width, num_classes))
    net = EarlyExitNet(stages, exits, num_classes)
    for m in net.modules():  # small-init linears, as in BERT/GPT
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


# ------------------------------------------------------------------------ factory
def build_model(
    cfg: ModelConfig,
    dataset: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int | None = None,
) -> EarlyExitNet:
    """Build the configured early-exit network for a dataset's input shape and class count.

    The inputs are checked first (:func:`cafe_ray.models.inputs.check_inputs`): text inputs
    (shape (L,), vocab_size given) need transformer4, image inputs (C, H, W) one of the CNNs.
    """
    shape = tuple(int(s) for s in input_shape)
    if cfg.name not in ("auto", *MODEL_NAMES) and plugin_target("model", cfg.name) is not None:
        return build_plugin_model(cfg, shape, num_classes, vocab_size)
    name = check_inputs(cfg.name, dataset, input_shape, num_classes, vocab_size)
    if name == "transformer4":
        return transformer4(shape, num_classes, cfg.width, vocab_size)
    builder = {"cnn_small": cnn_small, "conv3": conv3, "resnet18_ee": resnet18_ee}[name]
    return builder(shape, num_classes, cfg.width)


def build_plugin_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
                       vocab_size: int | None = None) -> EarlyExitNet:
    """Your own early-exit network: ``model.name`` is ``package.module:builder`` or an entry point
    (``cafe_ray.models``), called as ``builder(input_shape, num_classes, width=model.width)``
    (plus ``vocab_size=`` for token inputs). It must return an :class:`EarlyExitNet`, whose
    ``stages.{k}`` / ``exits.{k}`` parameters every algorithm relies on."""
    from cafe_ray.config import load_plugin

    builder = load_plugin("model", cfg.name)
    kwargs: dict[str, Any] = {"width": cfg.width}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    net = builder(tuple(input_shape), num_classes, **kwargs)
    if not isinstance(net, EarlyExitNet):
        raise ValueError(f"model.name={cfg.name}: the builder returned {type(net).__name__}, not an "
                         "EarlyExitNet (cafe_ray.models.EarlyExitNet(stages, exits, num_classes))")
    return net


def make_model(cfg: ExperimentConfig, ds: ArrayDataset) -> EarlyExitNet:
    """The experiment's model for its dataset, with deterministic initial weights (seeded by
    ``cfg.seed``; the global RNG is left as it was)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return build_model(cfg.model, ds.name, ds.input_shape, ds.num_classes,
                           vocab_size=cfg.data.vocab_size if ds.is_text else None)
    finally:
        torch.random.set_rng_state(state)


def count_params(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------- table
# model -> (example dataset, input shape, classes, vocab size)
DEFAULT_SETTINGS: dict[str, tuple[str, tuple[int, ...], int, int | None]] = {
    "cnn_small": ("fashion_mnist", (1, 28, 28), 10, None),
    "conv3": ("cifar10", (3, 32, 32), 10, None),
    "resnet18_ee": ("cifar100", (3, 32, 32), 100, None),
    "transformer4": ("agnews", (64,), 4, 20000),
}


def models_table(width: int | None = None) -> list[dict[str, Any]]:
    """One row per zoo model on its example dataset's shape, and per installed plug-in model
    (entry point ``cafe_ray.models``; its builder's ``example_input = (shape, classes)``, else
    (1, 28, 28) and 10): sizes and measured MACs per exit.

    ``width`` defaults to ModelConfig's default, i.e. what a run builds unless ``model.width``
    is set. The global RNG is left untouched.
    """
    from cafe_ray.config import entry_point_names, load_plugin
    from cafe_ray.models.macs import exit_macs

    w = ModelConfig().width if width is None else width
    rows: list[dict[str, Any]] = []
    settings = dict(DEFAULT_SETTINGS)
    for name in sorted(entry_point_names("model")):  # installed plug-ins, on the input they declare
        shape, classes = getattr(load_plugin("model", name), "example_input", ((1, 28, 28), 10))
        settings[name] = ("plug-in", tuple(shape), int(classes), None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, (dataset, shape, classes, vocab) in settings.items():
            net = build_model(ModelConfig(name=name, width=w), dataset, shape, classes, vocab_size=vocab)
            cost = exit_macs(net, shape, torch.int64 if vocab else torch.float32)
            backbone = sum(p.numel() for n, p in net.named_parameters() if n.startswith(BACKBONE_PREFIX))
            total = count_params(net)
            rows.append({
                "name": name,
                "dataset": dataset,
                "input_shape": list(shape),
                "num_classes": classes,
                "width": w,
                "num_exits": net.num_exits,
                "params": total,
                "backbone_params": backbone,
                "head_params": total - backbone,
                "exit_macs": list(cost.cumulative),
                "stage_macs": list(cost.stage_macs),
                "head_macs": list(cost.head_macs),
            })
    return rows
