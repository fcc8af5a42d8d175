"""`cafe-ray doctor`: what this machine offers a run, before starting one.

Versions (Python, torch, Ray, numpy), where each dataset would be read from,
free disk in output_dir and shared memory for Ray's object store, and the Ray
resources: what a local ``ray.init()`` would get (no cluster is started), or the
live totals of the cluster at ``--address``; with ``--config``, the device each
resource class of that config would train on here.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

DATASETS = ("digits", "synthetic", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "agnews")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as err:  # noqa: BLE001 - a broken install is what doctor is for
        return f"not importable ({type(err).__name__}: {err})"
    return str(getattr(mod, "__version__", "?"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def versions() -> dict[str, str]:
    """Python, cafe-ray and its main libraries."""
    out = {"python": f"{platform.python_version()} ({sys.executable})", "cafe-ray": _version("cafe_ray")}
    for m in ("torch", "ray", "numpy"):
        out[m] = _version(m)
    try:
        import torch

        out["torch devices"] = (f"CUDA, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available()
                                else "CPU only (no CUDA device visible)")
    except Exception:  # noqa: BLE001 - torch failing is shown by its version line above
        pass
    return out


def datasets(root: str | None) -> list[tuple[str, str | None, list[str]]]:
    """(name, where it would load from or None, folders tried) for every dataset."""
    from cafe_ray.config import DataConfig
    from cafe_ray.data.datasets import locate_dataset

    return [(n, *locate_dataset(DataConfig(name=n, root=root))) for n in DATASETS]


def disk(output_dir: Path) -> tuple[Path, int, int]:
    """(folder measured, free bytes, total bytes) of output_dir or its nearest existing parent."""
    p = output_dir.expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    u = shutil.disk_usage(p)
    return p, u.free, u.total


def resources(address: str | None) -> tuple[str, dict[str, float], int]:
    """(where from, resources, nodes): a live cluster at ``address``, else what a local Ray would get."""
    if address is None:
        from cafe_ray.sim.preflight import local_resources

        return "a local Ray (not started) would get", local_resources(), 1
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return f"the cluster at {address} has", {k: float(v) for k, v in ray.cluster_resources().items()}, len(nodes)
    finally:
        ray.shutdown()


def class_devices(config: Path, sets: list[str]) -> list[tuple[str, str]]:
    """(resource class, the device its client actors would train on here) for a config's catalog.

    A class with ``num_gpus`` trains on its GPU when torch sees CUDA on this machine
    (cafe_ray.sim.device decides it the same way inside each actor, from Ray's GPU ids).
    """
    import torch

    from cafe_ray.config import load_config
    from cafe_ray.sim.device import class_device
    from cafe_ray.sim.profiles import resolve_catalog

    cfg = load_config(config, sets)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [(c.name, f"num_gpus={c.num_gpus:g}: " + class_device(c.num_gpus, cuda, cfg.engine.gpu_standin).describe())
            for c in resolve_catalog(cfg.profiles).classes]


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        output_dir: Annotated[Path, typer.Option("--output-dir", help="Where runs would be written.")] = Path("runs"),
        data_root: Annotated[str | None, typer.Option("--data-root", help="data.root to look in (default: "
                                                      "$CAFE_RAY_DATA or ~/.cache/cafe-ray/data).")] = None,
        address: Annotated[str | None, typer.Option("--address", help="Also report this Ray cluster's "
                                                    "resources (connects to it; starts nothing).")] = None,
        config: Annotated[Path | None, typer.Option("--config", help="Also say which device each resource "
                                                    "class of this config would train on here.")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field (with --config), "
                                                       "e.g. profiles.classes.edge_gpu.num_gpus=0.25.")] = None,
    ) -> None:
        """Report versions, datasets found, free disk, Ray resources and, with --config, each class's
        training device (starts no cluster)."""
        t = Table(title="cafe-ray doctor", show_header=False)
        t.add_column("item", style="bold")
        t.add_column("value")
        for k, v in versions().items():
            t.add_row(k, v)
        missing = []
        for name, where, tried in datasets(data_root):
            if where is None:
                missing.append(name)
                t.add_row(f"dataset {name}", f"[red]not found[/] (tried {', '.join(tried)})")
            else:
                t.add_row(f"dataset {name}", f"[green]found[/] {where}")
        folder, free, total = disk(output_dir)
        t.add_row("output_dir", f"{output_dir}: {_gib(free)} free of {_gib(total)} (on {folder})")
        if Path("/dev/shm").is_dir():
            shm = shutil.disk_usage("/dev/shm")
            t.add_row("/dev/shm", f"{_gib(shm.free)} free (Ray's object store lives here)")
        t.add_row("CPU cores", str(len(os.sched_getaffinity(0))))
        try:
            src, res, nodes = resources(address)
        except Exception as err:  # noqa: BLE001 - report, do not crash
            t.add_row("Ray resources", f"[red]cannot reach {address}[/]: {err}")
        else:
            shown = ", ".join(f"{k}={'unbounded' if v == float('inf') else f'{v:g}'}"
                              for k, v in sorted(res.items()) if not k.startswith("node:"))
            t.add_row("Ray resources", f"{src} {shown} ({nodes} node{'s' if nodes != 1 else ''})")
        if config is not None:
            from cafe_ray.config import ConfigError

            try:
                rows = class_devices(config, set_ or [])
            except (ConfigError, ValueError) as err:
                Console(stderr=True).print(f"[red]error:[/] {err}", soft_wrap=True)
                raise typer.Exit(2) from None
            for name, where in rows:
                t.add_row(f"class {name} trains on", where)
        console.print(t, soft_wrap=True)
        if missing:
            console.print(f"missing datasets ({', '.join(missing)}) are needed only by configs that name "
                          "them; `cafe-ray validate CONFIG` says how to get one.")
