"""Check everything about an experiment that can be known without training, before Ray starts.

(Whether the model fits the data is checked here, by the zoo's rules without torch;
``simulate`` then builds the model, the one check that needs torch, in a thread while
Ray starts: ``model_in_background``; the run waits for it before creating anything.)

A mistake found here costs the user a few seconds and one line naming the field;
the same mistake found inside the coordinator cost a Ray start-up and a long
traceback. ``cafe-ray simulate`` and ``cafe-ray validate`` both call
:func:`preflight`, so "validate says ok" means "simulate gets past set-up".

Checked: the algorithm is registered, options set for another algorithm
(warned), the device catalog and its class overrides, the dataset is present and
readable, ``data.num_clients`` fits the data and the partition's constraints
(the partition is computed once, here, and the run reuses it), the model fits
the data and builds for it, ``output_dir`` is writable (and how much disk it
has), and the resource classes fit this machine when Ray would be started locally.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cafe_ray.config import ConfigError, ExperimentConfig
from cafe_ray.models.inputs import MODEL_NAMES, check_inputs
from cafe_ray.sim.plan import RunPlan, load_data, resolve_config

if TYPE_CHECKING:
    from cafe_ray.data.base import ArrayDataset
    from cafe_ray.sim.profiles import Catalog

LOW_DISK_BYTES = 200 * 2**20  # warn below this much free space in output_dir


@dataclass
class PreflightReport:
    """What the checks found; ``warnings`` are worth showing but do not stop a run."""

    warnings: list[str] = field(default_factory=list)
    train_samples: int | None = None  # pooled training samples after data.max_train_samples
    free_bytes: int | None = None  # free disk in output_dir
    resources: dict[str, float] | None = None  # what the classes were checked against
    resources_source: str = ""  # "this machine" | "the connected cluster" | "not checked"
    # the run as resolved here (catalog; with keep_data=True also the dataset and client splits
    # loaded and partitioned here): the run reuses it instead of resolving the config again
    plan: RunPlan | None = field(default=None, repr=False, compare=False)
    # the model check still running in a thread (preflight(..., model_in_background=True))
    pending: Future | None = field(default=None, repr=False, compare=False)

    def finish(self) -> PreflightReport:
        """Wait for a check still running in the background and raise its ConfigError, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()
        return self


def preflight(cfg: ExperimentConfig, *, address: str | None = None, create_output_dir: bool = True,
              check_data: bool = True, run_dir: str | Path | None = None, keep_data: bool = False,
              model_in_background: bool = False) -> PreflightReport:
    """Raise :class:`ConfigError` naming the field and the fix for the first problem found.

    ``address``: a remote Ray cluster; its nodes read the data, so a dataset missing
    here is only a warning, and its resources are checked by the executor instead.
    ``create_output_dir=False`` leaves no folder behind (``cafe-ray validate``).
    ``run_dir``: resuming this run directory, which must be writable (not output_dir).
    ``report.plan`` is the run resolved once (:class:`~cafe_ray.sim.plan.RunPlan`), for
    :func:`cafe_ray.sim.engine.run_simulation`; ``keep_data=True`` keeps the loaded dataset
    and its splits in it, so the run does not load and partition them again.
    ``model_in_background=True``: build the model (which imports torch, about 1 s) in a
    thread while the caller starts Ray; the caller must call ``report.finish()`` before
    the run starts (``run_simulation`` does), which raises the model's ConfigError.
    """
    report = PreflightReport()
    cfg = _resolve(cfg, check_data and address is None)
    _check_algorithm(cfg, report)
    if cfg.data.client is not None and "partition" in cfg.data.model_fields_set:
        report.warnings.append(f"data.partition is set but data.client={cfg.data.client} partitions the "
                               "data (one client per distinct value); data.partition is not used")
    catalog = _check_catalog(cfg)
    target = cfg.output_dir if run_dir is None else run_dir
    report.free_bytes = check_output_dir(target, keep=create_output_dir,
                                         field="output_dir" if run_dir is None else "--resume")
    if report.free_bytes is not None and report.free_bytes < LOW_DISK_BYTES:
        report.warnings.append(f"output_dir={target}: only {report.free_bytes / 2**20:.0f} MiB free; "
                               "a run writes checkpoints and client states there")
    data = None
    if check_data:
        try:
            data = _check_data(cfg, report, model_in_background)
        except ConfigError as err:
            if address is None:
                raise
            report.warnings.append(f"{err} (checked on this machine only: the cluster's nodes read "
                                   "data.root themselves)")
    if cfg.logging.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logging.tensorboard: needs tensorboardX (it comes with ray[tune]: "
                              "pip install tensorboardX), or set logging.tensorboard=false")
    _check_resources(cfg, catalog, address, report)
    report.plan = RunPlan(cfg, catalog).with_data(data if keep_data else None)
    return report


def resume_config(run_dir: str | Path) -> ExperimentConfig:
    """The saved config of a run directory that ``--resume`` continues."""
    from cafe_ray.config import load_saved_config
    from cafe_ray.runs.rundir import CONFIG

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG} there; pass a run directory made by "
                                "`cafe-ray simulate` (its path is printed when the run starts)")
    return load_saved_config(path)


# --------------------------------------------------------------------- checks
def _resolve(cfg: ExperimentConfig, strict: bool) -> ExperimentConfig:
    """The config as the run will use it (:func:`resolve_config`); a bad table is a ConfigError
    (``strict``) or, where a remote cluster's nodes read the data, left to them."""
    try:
        return resolve_config(cfg)
    except (ValueError, OSError) as err:
        if strict:
            raise ConfigError(str(err)) from None
        return cfg


def algorithm_names() -> list[str]:
    """The built-in names, plus any registered in this process, without importing the algorithms
    (torch, about 1 s): a registration needs ``cafe_ray.algorithms.base`` imported already."""
    import sys

    from cafe_ray.config import BUILTIN_ALGORITHMS

    base = sys.modules.get("cafe_ray.algorithms.base")
    return sorted({*BUILTIN_ALGORITHMS, *(base.available() if base is not None else ())})


def _check_algorithm(cfg: ExperimentConfig, report: PreflightReport) -> None:
    from cafe_ray.config import BUILTIN_ALGORITHMS, BUILTIN_VECTORIZABLE, plugin_target

    names = algorithm_names()
    if cfg.algorithm.name not in BUILTIN_ALGORITHMS and plugin_target("algorithm", cfg.algorithm.name):
        _check_plugin_algorithm(cfg)
    elif cfg.algorithm.options and cfg.algorithm.name in names:
        raise ConfigError(f"algorithm.options: {cfg.algorithm.name} is built in and reads "
                          f"algorithm.<its section>; options are for plug-in algorithms")
    elif cfg.algorithm.name not in names:
        raise ConfigError(f"algorithm.name={cfg.algorithm.name!r}: unknown algorithm; available: "
                          f"{', '.join(names)} (see `cafe-ray algorithms`)")
    for section in sorted(other_algorithm_settings(cfg)):
        report.warnings.append(f"algorithm.{section} is set but algorithm.name={cfg.algorithm.name} "
                               "does not read it")
    if cfg.engine.vectorize != "off" and cfg.algorithm.name in BUILTIN_ALGORITHMS \
            and cfg.algorithm.name not in BUILTIN_VECTORIZABLE:
        report.warnings.append(f"engine.vectorize={cfg.engine.vectorize}: {cfg.algorithm.name} does not train in "
                               f"batched cohorts, so its clients train one by one (batched: "
                               f"{', '.join(BUILTIN_VECTORIZABLE)}; `cafe-ray algorithms`)")


def _check_plugin_algorithm(cfg: ExperimentConfig) -> None:
    """Import a plug-in algorithm and build it with its options, as every worker will."""
    from cafe_ray.algorithms import build_algorithm

    try:
        build_algorithm(cfg)
    except KeyError as err:
        raise ConfigError(str(err.args[0]) if err.args else str(err)) from None
    except (ValueError, TypeError) as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith("algorithm.") else
                          f"algorithm.options: {cfg.algorithm.name}: {msg}") from None


def other_algorithm_settings(cfg: ExperimentConfig) -> list[str]:
    """The ``algorithm.<section>`` blocks of other algorithms that change something from their
    defaults. A block left at its defaults reads the same whether written or not: a run's saved
    config writes every block, and resuming it must warn no more than the run did."""
    algo = cfg.algorithm
    return [name for name, f in type(algo).model_fields.items()
            if name not in ("name", "options") and not algo.name.startswith(name)
            and getattr(algo, name).model_dump() != f.get_default(call_default_factory=True).model_dump()]


def _check_catalog(cfg: ExperimentConfig) -> Catalog:
    from cafe_ray.sim.profiles import resolve_catalog

    try:
        return resolve_catalog(cfg.profiles)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_output_dir(output_dir: str | Path, keep: bool = True, field: str = "output_dir") -> int | None:
    """Prove ``output_dir`` can hold files (create it, write and delete a probe); returns free bytes.

    ``keep=False`` removes the folders this call created. Runs as root too, where
    permission bits prove nothing: only a real write does.
    """
    path = Path(output_dir).expanduser()
    fix = "choose a writable folder, e.g. --set output_dir=runs"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{field}={output_dir}: {existing} is a file, not a folder; {fix}")
    created = []
    try:
        for p in reversed([path, *path.parents]):
            if not p.exists():
                p.mkdir()
                created.append(p)
        probe = path / f".cafe-ray-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(path).free
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{field}={output_dir}: cannot write there ({reason}); {fix}") from None
    finally:
        if not keep:
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
    return free


def _check_data(cfg: ExperimentConfig, report: PreflightReport, model_in_background: bool = False) -> tuple | None:
    """Load and partition the data as the run uses them; returns (dataset, splits), or None for
    TinyImageNet, whose files are only indexed here (the run loads and partitions them)."""
    from cafe_ray.data.base import DatasetNotFoundError
    from cafe_ray.data.readers import CorruptDatasetError

    d = cfg.data
    try:
        if d.name == "tinyimagenet":  # decoding 100k JPEGs twice is too slow: index the files only
            report.train_samples = _tinyimagenet_size(cfg)
            if d.num_clients > report.train_samples:
                raise ValueError(f"data.num_clients={d.num_clients} exceeds the {report.train_samples} "
                                 "training samples; every client needs at least one sample (lower "
                                 "data.num_clients or data.max_train_samples)")
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds, splits = load_data(cfg)
            report.train_samples = len(ds.y_train)
            # the model's fit to the data, by the zoo's own rules and without torch: a model
            # that cannot take these inputs stops here, before Ray starts
            if cfg.model.name in ("auto", *MODEL_NAMES):  # a plug-in model checks its inputs itself
                check_inputs(cfg.model.name, ds.name, ds.input_shape, ds.num_classes,
                             cfg.data.vocab_size if ds.is_text else None)
            if model_in_background:
                report.pending = _in_thread(_check_model, cfg, ds)
            else:
                _check_model(cfg, ds)
        report.warnings += [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
        return ds, splits
    except DatasetNotFoundError as err:
        raise ConfigError(f"data.name={d.name}: {err}") from None
    except CorruptDatasetError as err:
        raise ConfigError(f"data.root: {err}") from None
    except ValueError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(("data.", "model.")) else f"data: {msg}") from None


def _tinyimagenet_size(cfg: ExperimentConfig) -> int:
    from cafe_ray.data.datasets import data_root
    from cafe_ray.data.readers import tinyimagenet_index

    root = data_root(cfg.data)
    for folder in (root / "tiny-imagenet-200", root):
        if (folder / "wnids.txt").is_file() and (folder / "train").is_dir():
            n = len(tinyimagenet_index(folder)[1])
            return min(n, cfg.data.max_train_samples or n)
    from cafe_ray.data import load_dataset

    load_dataset(cfg.data, seed=cfg.seed)  # raises the loader's own "not found" message
    raise AssertionError("unreachable: the loader found what the index did not")


def _in_thread(fn, *args) -> Future:
    """``fn(*args)`` in a daemon thread; the future holds its exception."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(err)

    threading.Thread(target=run, name="cafe-ray-preflight", daemon=True).start()
    return fut


def _check_model(cfg: ExperimentConfig, ds: ArrayDataset) -> None:
    from cafe_ray.models import make_model

    try:
        make_model(cfg, ds)
    except ConfigError:
        raise
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ConfigError(f"model.name={cfg.model.name}: cannot build it for {ds.name} "
                          f"(input {tuple(ds.input_shape)}): {err}") from None


def local_resources() -> dict[str, float]:
    """What a local ``ray.init()`` on this machine would advertise (CPU, GPU)."""
    try:
        from ray._private.utils import get_num_cpus  # cgroup-aware, as ray.init itself counts

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - private API: fall back to the affinity mask
        cpus = float(len(os.sched_getaffinity(0)))
    try:  # Ray's own count (as ray.init makes it), without importing torch
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        gpus = float(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, float(len(visible)))
    except Exception:  # noqa: BLE001 - private API: fall back to torch
        try:
            import torch

            gpus = float(torch.cuda.device_count())
        except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU
            gpus = 0.0
    return {"CPU": cpus, "GPU": gpus}


def _check_resources(cfg: ExperimentConfig, catalog, address: str | None,
                     report: PreflightReport) -> None:
    if cfg.executor == "sequential":
        report.resources_source = "not checked (executor=sequential)"
        return
    from cafe_ray.sim.profiles import check_fits

    try:
        import ray

        running = ray.is_initialized()
    except ImportError:
        running = False
    if running:
        avail = {k: float(v) for k, v in ray.cluster_resources().items()}
        report.resources_source = "the connected cluster"
    elif address is None:
        avail = local_resources()
        report.resources_source = "this machine"
    else:
        report.resources_source = "not checked (the cluster is checked when the run starts)"
        return
    if not running:  # a local Ray has no custom resources; it sizes memory itself (not checked)
        avail["memory"] = float("inf")
    report.resources = avail
    try:
        check_fits(catalog.classes, avail)
    except ValueError as err:
        where = "this machine (a local Ray would start with these)" if not running else "the cluster"
        raise ConfigError(f"profiles.classes: {err} [checked against {where}: "
                          f"{', '.join(f'{k}={v:g}' for k, v in sorted(avail.items()) if k in ('CPU', 'GPU'))}]") from None
