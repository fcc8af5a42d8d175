"""Measured per-exit compute (MACs per sample) of an EarlyExitNet, cached.

The simulator turns MACs into virtual time on heterogeneous devices, so they must reflect the
real architecture: they are *measured* with ``torch.utils.flop_counter.FlopCounterMode`` on a
batch of one (MACs = flops // 2), stage by stage and head by head, never from hand formulas.
FlopCounterMode counts matmul-like ops (conv, linear, bmm, attention); norms, activations,
pooling and softmax are not counted (they are a small share of any of the zoo's models).

Results are cached in memory and on disk (``$CAFE_RAY_CACHE/macs.json``, default
``~/.cache/cafe-ray/macs.json``) keyed by an architecture signature, so every Ray worker and
every run of the same model measures once. A corrupt cache file is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cafe_ray.models.base import EarlyExitNet

_SCHEMA = "exit-macs-v1"  # bump when the measurement changes meaning


@dataclass(frozen=True)
class ExitCost:
    """MACs per sample of each stage and each exit head of an EarlyExitNet.

    ``cumulative[k]`` = stages 0..k + head k: what producing exit k's logits costs when only
    that head is evaluated. Iterating / indexing an ExitCost yields ``cumulative``.
    """

    stage_macs: list[int]
    head_macs: list[int]
    cumulative: list[int]

    @classmethod
    def from_parts(cls, stage_macs: list[int], head_macs: list[int]) -> ExitCost:
        cum, acc = [], 0
        for s, h in zip(stage_macs, head_macs, strict=True):
            acc += s
            cum.append(acc + h)
        return cls(list(stage_macs), list(head_macs), cum)

    def copy(self) -> ExitCost:
        """A copy with fresh lists (cached results are never handed out for mutation)."""
        return ExitCost(list(self.stage_macs), list(self.head_macs), list(self.cumulative))

    @property
    def num_exits(self) -> int:
        return len(self.stage_macs)

    @property
    def cascade(self) -> list[int]:
        """MACs to reach exit k having evaluated every head 0..k (an early-exit cascade)."""
        out, acc = [], 0
        for s, h in zip(self.stage_macs, self.head_macs, strict=True):
            acc += s + h
            out.append(acc)
        return out

    def train_macs(self, depth: int) -> int:
        """Forward MACs of a model truncated to its first ``depth`` exits (stages + heads)."""
        return int(sum(self.stage_macs[:depth]) + sum(self.head_macs[:depth]))

    def __len__(self) -> int:
        return len(self.cumulative)

    def __getitem__(self, k: int) -> int:
        return self.cumulative[k]

    def __iter__(self) -> Iterator[int]:
        return iter(self.cumulative)


# ----------------------------------------------------------------------- measure
def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """Flops of softmax(QK^T)V: two batched matmuls (PyTorch has no formula for the CPU kernel)."""
    *batch, sq, d = query_shape
    sk = key_shape[-2]
    dv = value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * sq * sk * d + 2 * b * sq * sk * dv


def _custom_mapping() -> dict[Any, Any]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def _example_input(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch of one, without touching the global RNG (measuring must not shift seeds)."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    if dtype.is_floating_point:
        return torch.zeros((1, *input_shape), dtype=dtype, device=device)  # (1, *input_shape)
    return torch.ones((1, *input_shape), dtype=dtype, device=device)  # (1, L): token 1, not padding


def measure_exit_cost(model: EarlyExitNet, input_shape: tuple[int, ...],
                      input_dtype: torch.dtype = torch.float32) -> ExitCost:
    """Measure (uncached) MACs of each stage and head with FlopCounterMode, in eval mode."""
    # imported here: it pulls in triton and torch._decomp (about 0.2 s), which a process that
    # reads the cache (every client actor, the coordinator) never needs
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in model.modules()}
    mapping = _custom_mapping()
    stage_macs: list[int] = []
    head_macs: list[int] = []
    try:
        model.eval()
        h: Any = _example_input(model, input_shape, input_dtype)
        with torch.no_grad():
            for stage, head in zip(model.stages, model.exits, strict=True):
                with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
                    h = stage(h)
                stage_macs.append(int(fc.get_total_flops()) // 2)
                with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
                    head(h)  # (1, K)
                head_macs.append(int(fc.get_total_flops()) // 2)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ExitCost.from_parts(stage_macs, head_macs)


# ------------------------------------------------------------------------- cache
_MEMORY: dict[str, ExitCost] = {}


def cache_path() -> Path:
    """``$CAFE_RAY_CACHE/macs.json`` or ``~/.cache/cafe-ray/macs.json``."""
    root = os.environ.get("CAFE_RAY_CACHE")
    base = Path(root).expanduser() if root else Path("~/.cache/cafe-ray").expanduser()
    return base / "macs.json"


def architecture_key(model: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype) -> str:
    """Hash of what determines the MACs: class, module tree (strides, kernels...), tensor shapes.

    Parameter shapes alone miss e.g. a changed stride, hence the module repr as well.
    """
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    blob = json.dumps({
        "schema": _SCHEMA,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "repr": repr(model),
        "tensors": tensors,
        "input_shape": [int(s) for s in input_shape],
        "input_dtype": str(input_dtype),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_disk(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # corrupt / unreadable: start over (rewritten on the next store)
    return data if isinstance(data, dict) else {}


def _parse_entry(entry: Any, num_exits: int) -> ExitCost | None:
    try:
        stage = [int(v) for v in entry["stage_macs"]]
        head = [int(v) for v in entry["head_macs"]]
    except (TypeError, KeyError, ValueError):
        return None
    if len(stage) != num_exits or len(head) != num_exits:
        return None
    return ExitCost.from_parts(stage, head)


def _write_disk(path: Path, key: str, cost: ExitCost) -> None:
    data = _read_disk(path)
    data[key] = {"stage_macs": cost.stage_macs, "head_macs": cost.head_macs}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file
    except OSError as err:
        warnings.warn(f"could not write MACs cache {path}: {err}", stacklevel=3)


def exit_macs(model: EarlyExitNet, input_shape: tuple[int, ...],
              input_dtype: torch.dtype = torch.float32) -> ExitCost:
    """Per-sample MACs per exit (``.cumulative``; also ``.stage_macs`` / ``.head_macs``), cached.

    ``input_shape`` excludes the batch dimension; ``input_dtype`` is torch.int64 for token ids.
    """
    key = architecture_key(model, input_shape, input_dtype)
    if key in _MEMORY:
        return _MEMORY[key].copy()
    path = cache_path()
    cost = _parse_entry(_read_disk(path).get(key), model.num_exits)
    if cost is None:
        cost = measure_exit_cost(model, input_shape, input_dtype)
        _write_disk(path, key, cost)
    _MEMORY[key] = cost
    return cost.copy()


def clear_memory_cache() -> None:
    """Forget in-process results (tests; the disk cache is untouched)."""
    _MEMORY.clear()
