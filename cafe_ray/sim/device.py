"""Which torch device a client actor trains on, decided from the Ray resources it holds.

A resource class with ``num_gpus`` reserves (a share of) a GPU for each of its
actors; Ray then tells the actor which GPU ids are its own and narrows
``CUDA_VISIBLE_DEVICES`` to them. The actor trains on the first of those GPUs
when torch sees CUDA, on the CPU otherwise (saying why). Algorithms never decide
this: the Ray layer resolves the device here and hands it to the
:class:`~cafe_ray.sim.runner.ClientRunner`.

``engine.gpu_standin`` names a device that takes the GPU's place (``cpu``): a GPU
class then runs the same path (resolution from the actor's GPU ids, model,
batches and state moved onto the device and back) on a machine without CUDA.
Tests use it; so can a laptop trying a GPU catalog.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # a torch device string: "cpu", "cuda:0", ...
    gpu_ids: tuple[str, ...]  # the GPU ids Ray assigned to the actor (empty: none reserved)
    note: str  # why this device, one line for the run summary and doctor

    def describe(self) -> str:
        return f"{self.device} ({self.note})"


def choose_device(gpu_ids: Sequence[str], cuda_count: int, visible: str | None = None,
                  standin: str | None = None) -> DeviceChoice:
    """The device for an actor holding ``gpu_ids`` where torch sees ``cuda_count`` CUDA devices.

    ``visible`` is the actor's ``CUDA_VISIBLE_DEVICES`` (Ray narrows it to the
    assigned ids, so the first id is ``cuda:0``); ``standin`` replaces the GPU.
    """
    ids = tuple(str(i) for i in gpu_ids)
    if not ids:
        return DeviceChoice("cpu", ids, "no GPU reserved")
    order = [v.strip() for v in visible.split(",")] if visible else None
    index = (order.index(ids[0]) if ids[0] in order else 0) if order is not None else int(ids[0])
    target = f"cuda:{index}"
    if standin:
        return DeviceChoice(standin, ids, f"stands in for {target}, GPU {ids[0]} (engine.gpu_standin)")
    if cuda_count <= index:
        return DeviceChoice("cpu", ids, f"GPU {ids[0]} reserved but torch sees {cuda_count} CUDA device(s): "
                                        "training on the CPU (install torch's CUDA build on GPU nodes)")
    return DeviceChoice(target, ids, f"GPU {ids[0]}")


def actor_device(standin: str | None) -> DeviceChoice:
    """Inside a Ray actor: :func:`choose_device` from the GPU ids Ray assigned to it."""
    import ray
    import torch

    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    cuda = torch.cuda.device_count() if ids and not standin and torch.cuda.is_available() else 0
    return choose_device(ids, cuda, os.environ.get("CUDA_VISIBLE_DEVICES"), standin)


def class_device(num_gpus: float, cuda_count: int, standin: str | None = None) -> DeviceChoice:
    """What an actor of a class reserving ``num_gpus`` would train on here (``cafe-ray doctor``):
    a class with GPUs gets the node's first GPU (id 0) as Ray assigns them."""
    return choose_device(["0"] if num_gpus > 0 else [], cuda_count, None, standin)
