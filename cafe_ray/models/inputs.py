"""Which architecture fits which inputs, decided without torch.

The rules are written once, here: the zoo's builders apply them when they build a
model, and preflight applies them to a config and its loaded data before Ray starts,
where importing torch would cost the driver about a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from cafe_ray.config import BUILTIN_MODELS

MODEL_NAMES: tuple[str, ...] = BUILTIN_MODELS
IMAGE_MODELS: tuple[str, ...] = ("cnn_small", "conv3", "resnet18_ee")
TEXT_MODELS: tuple[str, ...] = ("transformer4",)

# name "auto" -> architecture, per dataset (see ModelConfig)
AUTO_MODEL: dict[str, str] = {
    "digits": "cnn_small",
    "fashion_mnist": "cnn_small",
    "synthetic": "cnn_small",
    "cifar10": "conv3",
    "cifar100": "resnet18_ee",
    "tinyimagenet": "resnet18_ee",
    "agnews": "transformer4",
}

# image architectures: the smallest input height and width they take (their pooling depth)
MIN_SIDE: dict[str, int] = {"cnn_small": 4, "conv3": 8, "resnet18_ee": 8}


def resolve_model_name(name: str, dataset: str, input_shape: Sequence[int] | None = None) -> str:
    """The concrete architecture for ``model.name`` (resolving "auto" by dataset).

    A dataset without a default of its own (your files: ``data.name: parquet``) gets one by
    its input shape, when known: transformer4 for token ids (L,), else the CNN that fits
    its image size.
    """
    if name == "auto":
        if dataset not in AUTO_MODEL and input_shape is not None:
            return auto_for_shape(input_shape)
        if dataset not in AUTO_MODEL:
            raise ValueError(
                f"model.name='auto' has no default for dataset {dataset!r}; set model.name to one of "
                f"{', '.join(MODEL_NAMES)} (auto knows: {', '.join(AUTO_MODEL)})"
            )
        return AUTO_MODEL[dataset]
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name={name!r} is unknown; allowed: auto, {', '.join(MODEL_NAMES)}, or your "
                         "own builder as package.module:function")
    return name


def auto_for_shape(input_shape: Sequence[int]) -> str:
    """The zoo model "auto" picks for inputs of this shape: transformer4 for (L,), else the
    CNN for (C, H, W): conv3 for colour images of side >= 32, else cnn_small."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 1:
        return "transformer4"
    if len(shape) == 3 and shape[0] == 3 and min(shape[1:]) >= 32:
        return "conv3"
    return "cnn_small"


def check_image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of an image input that architecture ``name`` takes; else a ValueError with the fix."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"model.name={name!r} needs image inputs of shape (C, H, W), got {shape}")
    c, h, w = shape
    if min(h, w) < MIN_SIDE[name] or c < 1:
        fits = [m for m in IMAGE_MODELS if min(h, w) >= MIN_SIDE[m]]
        fix = (f"set model.name to {' or '.join(fits)}" if fits and c >= 1
               else f"no zoo model takes H or W below {min(MIN_SIDE.values())}")
        raise ValueError(f"model.name={name!r} needs H, W >= {MIN_SIDE[name]}, got input shape {shape}; {fix}")
    return c, h, w


def check_inputs(name: str, dataset: str, input_shape: Sequence[int], num_classes: int,
                 vocab_size: int | None = None) -> str:
    """The architecture ``model.name`` resolves to, once it is known to fit these inputs.

    Text inputs (shape (L,)) need a text model and a vocabulary; image inputs (C, H, W)
    need an image model whose pooling fits H and W. A mismatch is a ValueError that
    names ``model.name`` and the values that would fit.
    """
    arch = resolve_model_name(name, dataset, input_shape)
    shape = tuple(int(s) for s in input_shape)
    is_text = len(shape) == 1
    if num_classes < 2:
        raise ValueError(f"model.name={arch!r}: need num_classes >= 2, got {num_classes}")
    if is_text and arch not in TEXT_MODELS:
        raise ValueError(
            f"model.name={arch!r} does not fit dataset {dataset!r} (token inputs of shape {shape}); "
            f"allowed for text: auto, {', '.join(TEXT_MODELS)}"
        )
    if not is_text and arch in TEXT_MODELS:
        raise ValueError(
            f"model.name={arch!r} does not fit dataset {dataset!r} (image inputs of shape {shape}); "
            f"allowed for images: auto, {', '.join(IMAGE_MODELS)}"
        )
    if is_text and (vocab_size is None or vocab_size < 2):
        raise ValueError(f"model.name={arch!r} on dataset {dataset!r} needs vocab_size >= 2, got {vocab_size}")
    if not is_text:
        check_image_shape(arch, shape)
    return arch
