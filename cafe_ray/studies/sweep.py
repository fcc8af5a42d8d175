"""Ray Tune sweeps over any config field, with ASHA early stopping on rounds.

A sweep is a base config plus a *space*: a YAML mapping from dotted config keys to
Tune search spaces::

    algorithm.cafedistill.lam: {grid: [0.0, 0.5, 1.0]}
    algorithm.cafedistill.tau: {choice: [1.0, 3.0]}
    algorithm.cafedistill.mu: {loguniform: [0.05, 5.0]}
    train.lr: {uniform: [0.01, 0.1]}
    train.local_epochs: {randint: [1, 4]}     # Tune's randint: upper bound excluded
    round.num_rounds: 10                      # a plain value is a fixed override

Each trial is one simulation (same seed as the base, so trials see the same
partition and profiles and differ only in the swept fields). The trial function
runs the round loop itself (``engine.run_here``): a Tune trial already is a Ray
actor, so it takes the coordinator's role instead of starting a coordinator actor,
and reports to Tune from ``Simulation.run``'s ``on_round`` callback at every
evaluation round (metric ``acc_avg_exit``, mode max, time attribute ``round`` =
rounds completed). Its resources are a placement group sized from the trial's
resolved device catalog: bundle 0 for the trial process (``coordinator_cpus``,
default 0), then one bundle per client actor with its class's Ray resources. The
client actors are created inside that group and the Ray executor fits its pools to
the group (``executor.fit_capacity``), so concurrent trials never oversubscribe the
cluster.

Outputs in OUT: ``results.md`` / ``results.csv`` / ``results.parquet`` (one row per
trial, best first), ``best_config.yaml`` (the base with the best trial's values, ready
for ``cafe-ray simulate``), ``best.json``, ``sweep.json`` (what was asked), one
simulation run directory per trial in ``runs/<trial_id>``, and Tune's experiment in
``tune/``. An interrupted sweep continues with ``resume=True`` (``Tuner.restore``):
finished trials are kept, unfinished ones restart, and a trial whose run directory
has a simulation checkpoint resumes from it after reporting again every evaluation the
checkpoint holds. ASHA's rungs are rebuilt from the finished trials' reported results
(``cafe_ray.studies.asha``), so early stopping decides as without the interruption.
``check_sweep`` validates config, space and OUT before Ray starts.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cafe_ray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    dump_config,
)
from cafe_ray.studies import signing

if TYPE_CHECKING:  # imports ray.tune
    from cafe_ray.studies.asha import OrderedASHA

METRIC = "acc_avg_exit"  # what every evaluated round reports (test split)
VAL_METRIC = "val_acc_avg_exit"  # what trials are ranked and stopped by when a validation split exists
MODE = "max"
TIME_ATTR = "round"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_EXAMPLE = "e.g. 'algorithm.cafedistill.lam: {grid: [0.5, 1.0]}'"


# ------------------------------------------------------------------ the space
def load_space(path: str | Path) -> dict[str, Any]:
    """Read and check a space YAML (see the module docstring for the format)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep space not found: {p} (pass a YAML file, e.g. simulations/sweep_cafedistill.yaml)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return check_space(raw, str(p))


def check_space(raw: Any, source: str = "<space>") -> dict[str, Any]:
    """Validate the *shape* of a space; returns it as a plain dict."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: a sweep space maps dotted config keys to search spaces, {_EXAMPLE}")
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not key.strip(". "):
            raise ConfigError(f"{source}: keys must be dotted config paths, got {key!r}")
        if isinstance(spec, list):
            raise ConfigError(f"{where}: a bare list is ambiguous; write {{grid: {spec}}} (every value) "
                              f"or {{choice: {spec}}} (sampled)")
        if not isinstance(spec, dict):
            continue  # a fixed value
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: a search space is one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r} "
                              f"(a fixed mapping value goes in {{grid: [VALUE]}})")
        kind, args = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
            continue
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs low < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: randint needs integer bounds, got [{lo}, {hi}]")
    return dict(raw)


def candidate_values(spec: Any) -> list[Any]:
    """Values that represent a space when validating it: every grid/choice value, both bounds."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]  # Tune's randint excludes the upper bound
    return list(args)


def validate_against(base: dict[str, Any], space: dict[str, Any], source: str = "<space>") -> None:
    """Fail fast: every key must be a config field and every candidate value valid for it."""
    for key, spec in space.items():
        for v in candidate_values(spec):
            try:
                trial_config(base, {key: v})
            except ConfigError as err:
                raise ConfigError(f"{source}: {key}={v!r} does not make a valid config:\n{err}") from None


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """The space as Tune's own search-space objects (param_space)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        out[key] = {
            "grid": lambda a: tune.grid_search(list(a)),
            "choice": lambda a: tune.choice(list(a)),
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a),
        }[kind](args)
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any], **top: Any) -> ExperimentConfig:
    """The base config with a trial's values (dotted keys) and top-level fields applied."""
    raw = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    raw.update(top)
    label = ", ".join(f"{k}={v}" for k, v in params.items()) or "base"
    return build_config(raw, f"sweep trial [{label}]")


# ------------------------------------------------------------- trial resources
def trial_bundles(cfg: ExperimentConfig, coordinator_cpus: float = 0.0) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: [trial process, one per client actor]."""
    from cafe_ray.sim.profiles import resolve_catalog

    if cfg.executor == "sequential":
        return [{"CPU": max(1.0, coordinator_cpus)}]  # every client runs in the trial process
    bundles: list[dict[str, float]] = [{"CPU": float(coordinator_cpus)} if coordinator_cpus else {}]
    for c in resolve_catalog(cfg.profiles).classes:
        b: dict[str, float] = {"CPU": c.num_cpus, "GPU": c.num_gpus, "memory": c.memory or 0, **c.resources}
        b = {k: float(v) for k, v in b.items() if v}
        if b:  # an actor that needs nothing needs no bundle
            bundles.extend(dict(b) for _ in range(c.actors or 1))
    if len(bundles) == 1 and not bundles[0]:
        bundles[0] = {"CPU": 1.0}
    return bundles


def _trial_resources(params: dict[str, Any], *, base: dict[str, Any], coordinator_cpus: float):
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory(trial_bundles(trial_config(base, params), coordinator_cpus), strategy="PACK")


# ----------------------------------------------------------------- the trial
def tune_metrics(rec: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports for one evaluated round (scalars only; ``round`` = rounds done)."""
    out: dict[str, Any] = {TIME_ATTR: int(rec["round"]) + 1}
    for k in ("acc_avg_exit", "acc_worst_client", "acc_worst_client_last_exit", "train_loss",
              "virtual_time_s", "failed", "completed", "val_acc_avg_exit", "val_acc_worst_client"):
        if rec.get(k) is not None:
            out[k] = rec[k]
    for i, a in enumerate(rec.get("acc_exit") or []):
        out[f"acc_exit_{i + 1}"] = a
    out["cum_bytes"] = int(rec.get("cum_bytes_down", 0)) + int(rec.get("cum_bytes_up", 0))
    return out


def _resolve_paths(cfg: ExperimentConfig, cwd: str) -> ExperimentConfig:
    """Relative data/trace paths are meant from where the sweep started (Tune changes cwd)."""
    data, prof = cfg.data, cfg.profiles
    if data.root and not Path(data.root).is_absolute():
        data = data.model_copy(update={"root": str(Path(cwd) / data.root)})
    if prof.catalog.endswith(".json") and not Path(prof.catalog).is_absolute():
        prof = prof.model_copy(update={"catalog": str(Path(cwd) / prof.catalog)})
    return cfg.model_copy(update={"data": data, "profiles": prof})


def _trial(params: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """Tune function trainable: one simulation, reported at every evaluation round."""
    from ray import tune

    from cafe_ray.runs import rundir
    from cafe_ray.sim.engine import run_here

    trial_id = tune.get_context().get_trial_id()
    runs = Path(spec["out"]) / "runs"
    cfg = trial_config(spec["base"], {k: params[k] for k in spec["space"] if k in params},
                       name=f"{spec['base'].get('name', 'experiment')}-{trial_id}", output_dir=str(runs))
    cfg = _resolve_paths(cfg, spec["cwd"])
    run_dir = runs / trial_id
    resume = (run_dir / "config.yaml").is_file()  # a restored trial continues its simulation
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    last = cfg.round.num_rounds - 1
    if resume:
        # Tune may never have received the evaluations this run checkpointed (interrupted
        # between a checkpoint and its report), and a restored sweep's ASHA has no rungs for
        # unfinished trials: report every checkpointed evaluation again, in order, so that
        # early stopping sees exactly what an uninterrupted trial would have reported
        for rec in checkpointed_evaluations(run_dir, last):
            tune.report(tune_metrics(rec))

    def on_round(rec: dict[str, Any]) -> None:
        # the last round is reported after the run has written its summary: Tune may
        # stop a trial as soon as it reports, and ASHA always stops one at max_t
        if rec.get(METRIC) is not None and rec["round"] < last:
            tune.report(tune_metrics(rec))

    run_here(cfg, run_dir, resume=resume, on_round=on_round)
    final = [r for r in rundir.read_jsonl(run_dir / rundir.METRICS) if r.get(METRIC) is not None]
    if final and final[-1]["round"] == last:
        tune.report(tune_metrics(final[-1]))


def checkpointed_evaluations(run_dir: Path, last: int) -> list[dict[str, Any]]:
    """Evaluated rounds before ``last`` that the run directory's latest checkpoint covers."""
    from cafe_ray.runs import rundir

    ckpt = rundir.latest_checkpoint(run_dir)
    if ckpt is None:
        return []
    done = int(ckpt.name.rsplit("_", 1)[1])  # checkpoints/round_000002: rounds 0..2 are in it
    return [r for r in rundir.read_jsonl(run_dir / rundir.METRICS)
            if r.get(METRIC) is not None and r["round"] <= done and r["round"] < last]


# ------------------------------------------------------------------ the sweep
@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per trial, best first
    best: dict[str, Any] | None  # the best row (None when no trial reported)
    paths: dict[str, Path]  # results_md, results_csv, results_parquet, best_config, best_json
    interrupted: bool = False  # some trials did not finish: run again with resume=True
    params: list[str] = field(default_factory=list)  # swept keys (table columns)


def selection_metric(base: dict[str, Any]) -> str:
    """Rank and stop trials on validation when the config carves one (data.val_fraction > 0).

    Without a validation split the test split is all there is, and the sweep says so.
    """
    return VAL_METRIC if build_config(base).data.val_fraction > 0 else METRIC


def max_rounds(base: dict[str, Any], space: dict[str, Any]) -> int:
    rounds = [build_config(base).round.num_rounds]
    if "round.num_rounds" in space:
        rounds += [int(v) for v in candidate_values(space["round.num_rounds"])]
    return max(rounds)


def check_sweep(base: dict[str, Any], space: dict[str, Any], out: str | Path, *, samples: int = 1,
                resume: bool = False, grace_period: int | None = None, reduction_factor: float = 2.0,
                coordinator_cpus: float = 0.0, trust_pickles: bool = False) -> dict[str, Any]:
    """Everything a sweep can get wrong before Ray starts; returns the sweep's spec.

    Checks the space and every candidate value against the config, the ASHA settings, and
    OUT: a new sweep needs an OUT without one, ``resume`` needs Tune's state there signed by
    this installation (:mod:`cafe_ray.studies.signing`; ``trust_pickles`` skips that) and the
    same config and space as the sweep saved there (whose own spec, ASHA settings included,
    is then returned).
    """
    out = Path(out).resolve()
    space = check_space(space)
    cfg0 = build_config(base, "sweep base config")
    validate_against(base, space)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor must be > 1 (ASHA keeps 1/factor of the trials per rung), "
                          f"got {reduction_factor}")
    if grace_period is not None and grace_period < 1:
        raise ConfigError(f"--grace-period must be >= 1 round, got {grace_period}")
    exp_path = out / "tune"
    spec_path = out / "sweep.json"
    if resume:
        if not spec_path.is_file() or not (exp_path / "tuner.pkl").is_file():
            raise ConfigError(f"--resume: no sweep to continue in {out} (no sweep.json / tune experiment there)")
        if not trust_pickles:
            signing.check_trusted(out)  # before anything in it is unpickled
        saved = json.loads(spec_path.read_text())
        if saved["base"] != json.loads(json.dumps(base)) or saved["space"] != json.loads(json.dumps(space)):
            raise ConfigError(f"--resume: the config or space differ from the sweep saved in {spec_path}; "
                              "resume with the same CONFIG, --set and --space, or choose a new --out")
        return saved
    if exp_path.exists():
        raise ConfigError(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
    t_max = max_rounds(base, space)
    return {"base": base, "space": space, "samples": samples, "out": str(out), "cwd": os.getcwd(),
            "coordinator_cpus": coordinator_cpus, "search_seed": cfg0.seed,
            "scheduler": {"metric": selection_metric(base), "mode": MODE, "max_t": t_max,
                          "grace_period": grace_period or min(cfg0.round.eval_every, t_max),
                          "reduction_factor": reduction_factor}}


def check_placeable(spec: dict[str, Any]) -> None:
    """Fail fast, naming the class, when a trial's placement group could never be scheduled.

    A bundle (one client actor) must fit on one node; without an autoscaler the nodes that
    are up are all there will be (with one, the autoscaler decides, and Tune reports what
    stays pending).
    """
    import ray

    from cafe_ray.sim.autoscale import actor_bundle, autoscaler_state
    from cafe_ray.sim.profiles import resolve_catalog

    if autoscaler_state().present:
        return
    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    seen: set[str] = set()
    variants = [{}] + [{k: v} for k, sp in spec["space"].items() for v in candidate_values(sp)]
    for params in variants:
        cfg = trial_config(spec["base"], params)
        if cfg.executor == "sequential":
            continue
        for c in resolve_catalog(cfg.profiles).classes:
            need = actor_bundle(c)
            if c.name in seen or any(all(n.get(r, 0.0) + 1e-9 >= v for r, v in need.items()) for n in nodes):
                continue
            seen.add(c.name)
            where = ", ".join(f"{k}={v}" for k, v in params.items()) or "the base config"
            raise ConfigError(
                f"sweep: one client actor of class {c.name!r} ({where}) needs {need}, but no node of this "
                f"cluster has that much and no autoscaler can add one; lower profiles.classes.{c.name}.* "
                "(num_cpus, num_gpus, resources) or run on a cluster whose nodes advertise it")


def search_seed(spec: dict[str, Any]) -> int:
    """The seed of the sampled search-space values: the base config's ``seed``."""
    return int(spec.get("search_seed", build_config(spec["base"]).seed))


def make_scheduler(spec: dict[str, Any]) -> OrderedASHA:
    """The sweep's ASHA from its spec (a sweep saved before the spec kept it: the defaults).

    Rung decisions are taken in trial order (:class:`~cafe_ray.studies.asha.OrderedASHA`), so
    the same sweep stops the same trials at the same rungs at any concurrency.
    """
    from cafe_ray.studies.asha import OrderedASHA

    base, space = spec["base"], spec["space"]
    t_max = max_rounds(base, space)
    sched = spec.get("scheduler") or {
        "metric": selection_metric(base), "mode": MODE, "max_t": t_max,
        "grace_period": min(build_config(base).round.eval_every, t_max), "reduction_factor": 2.0}
    return OrderedASHA(time_attr=TIME_ATTR, metric=sched["metric"], mode=sched["mode"], max_t=sched["max_t"],
                         grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"])


def reported_histories(exp_path: Path, metric: str) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """What each finished trial reported to Tune, in order, and the ids of the unfinished ones."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(exp_path))
    frames = analysis.trial_dataframes
    finished: dict[str, list[tuple[float, float]]] = {}
    pending: list[str] = []
    for trial in analysis.trials:
        if trial.status not in ("TERMINATED", "ERROR"):
            pending.append(trial.trial_id)
            continue
        df = frames.get(trial.trial_id)
        if df is None or TIME_ATTR not in df or metric not in df:
            finished[trial.trial_id] = []
            continue
        rows = df[[TIME_ATTR, metric]].dropna()
        finished[trial.trial_id] = [(float(t), float(v)) for t, v in rows.itertuples(index=False)]
    return finished, pending


def _set_restored_scheduler(tuner: Any, scheduler: Any) -> None:
    """Give a restored Tuner the rebuilt scheduler (Tune would reuse the pickled, empty one)."""
    inner = getattr(tuner, "_local_tuner", None)
    cfg = getattr(inner, "_tune_config", None)
    if cfg is None or not hasattr(cfg, "scheduler"):
        raise RuntimeError("cannot hand the rebuilt ASHA rungs to this Ray version's restored Tuner "
                           "(Tuner._local_tuner._tune_config is gone); pin ray as constraints.txt does")
    if getattr(cfg, "metric", None) or getattr(cfg, "mode", None):
        # a sweep saved before the scheduler carried metric and mode
        scheduler._metric = scheduler._mode = None
        scheduler._metric_op = None
    cfg.scheduler = scheduler


def _set_restored_signer(tuner: Any, out: Path) -> None:
    """Sign the restored sweep as it runs (the pickled run config may hold none, or another folder's)."""
    inner = getattr(tuner, "_local_tuner", None)
    run_config = getattr(inner, "_run_config", None)
    if run_config is None:
        raise RuntimeError("cannot hand the signer to this Ray version's restored Tuner "
                           "(Tuner._local_tuner._run_config is gone); pin ray as constraints.txt does")
    kept = [cb for cb in (run_config.callbacks or []) if not isinstance(cb, signing.Signer)]
    run_config.callbacks = [*kept, signing.tune_callback(out)]


def run_sweep(
    base: dict[str, Any],
    space: dict[str, Any],
    out: str | Path,
    *,
    samples: int = 1,
    resume: bool = False,
    grace_period: int | None = None,
    reduction_factor: float = 2.0,
    max_concurrent_trials: int | None = None,
    coordinator_cpus: float = 0.0,
    callbacks: Sequence[Any] = (),
    verbose: int = 1,
    trust_pickles: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep on the connected Ray cluster; write its table and best config.

    ``base`` is a raw config mapping (YAML), ``space`` a checked space (``load_space``).
    ASHA stops trials on ``round`` with ``grace_period`` (default: the first
    evaluation round) and ``reduction_factor``. ``callbacks`` are Tune callbacks.
    Tune's pickled state is signed while the sweep runs; a resume refuses state this
    installation did not sign unless ``trust_pickles`` (then it is re-signed as ours).
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    out = Path(out).resolve()
    spec = check_sweep(base, space, out, samples=samples, resume=resume, grace_period=grace_period,
                       reduction_factor=reduction_factor, coordinator_cpus=coordinator_cpus,
                       trust_pickles=trust_pickles)
    if resume and trust_pickles:
        warnings.warn(f"--trust-pickles: unpickling Ray Tune's state in {out} as it is (this runs any code it "
                      "holds): " + "; ".join(signing.trust_report(out)), stacklevel=2)
    exp_path = out / "tune"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec),
        resources=functools.partial(_trial_resources, base=spec["base"],
                                    coordinator_cpus=float(spec["coordinator_cpus"])),
    )
    check_placeable(spec)
    scheduler = make_scheduler(spec)
    if resume:
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
        finished, pending = reported_histories(exp_path, scheduler.metric)
        scheduler.replay(finished, pending)  # the rungs as they were (Tune restores none)
        _set_restored_scheduler(tuner, scheduler)
        _set_restored_signer(tuner, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(spec, indent=1))
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(spec["space"]),
            tune_config=tune.TuneConfig(  # metric and mode live in the scheduler (see make_scheduler)
                num_samples=samples, scheduler=scheduler,
                # sampled values (choice, uniform, ...) drawn from the sweep's seed: the same trials every
                # time; the generator holds the concurrency cap (Tune ignores max_concurrent_trials
                # when it is given a search_alg that is not a Searcher)
                search_alg=BasicVariantGenerator(max_concurrent=max_concurrent_trials or 0,
                                                 random_state=search_seed(spec)),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=verbose,
                                      callbacks=[*callbacks, signing.tune_callback(out)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    signing.sign(out)  # tuner.pkl, written by Tuner(): signed before any trial runs
    try:
        tuner.fit()
    finally:
        signing.sign(out)  # Tune's final state (also after Ctrl+C, which fit() returns from)
    return collect_results(out)


# ---------------------------------------------------------------- the results
def collect_results(out: str | Path) -> SweepResult:
    """Read the sweep in OUT (Tune's experiment state + run dirs); write table and best config."""
    from ray import tune

    out = Path(out).resolve()
    spec = json.loads((out / "sweep.json").read_text())
    keys = list(spec["space"])
    analysis = tune.ExperimentAnalysis(str(out / "tune"))
    rows = []
    interrupted = False
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        params = {k: trial.config.get(k) for k in keys}
        rounds_total = trial_config(spec["base"], params).round.num_rounds
        done = int(last[TIME_ATTR]) if TIME_ATTR in last else 0
        if trial.status == "ERROR":
            status = "error"
        elif trial.status != "TERMINATED":
            status, interrupted = "unfinished", True
        else:
            status = "completed" if done >= rounds_total else "stopped (ASHA)"
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": status, **params,
                               "rounds": done, "rounds_total": rounds_total}
        for k in ("acc_avg_exit", "acc_worst_client", "acc_worst_client_last_exit", "val_acc_avg_exit"):
            row[k] = last.get(k)
        for k in sorted((k for k in last if k.startswith("acc_exit_")), key=lambda s: int(s.rsplit("_", 1)[1])):
            row[k] = last[k]
        row["cum_bytes"] = last.get("cum_bytes")
        row["run_dir"] = str(out / "runs" / trial.trial_id)
        row["error"] = _error_text(trial) if status == "error" else ""
        rows.append(row)
    metric = selection_metric(spec["base"])
    rows.sort(key=lambda r: _rank_key(r, metric))
    best = next((r for r in rows if r[metric] is not None), None)
    paths = write_results(rows, best, spec, out)
    return SweepResult(rows, best, paths, interrupted, keys)


def _rank_key(r: dict[str, Any], metric: str = METRIC) -> tuple:
    acc = r[metric]
    return (r["status"] != "completed", acc is None, -(acc or 0.0), r["trial_id"])


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "failed (see Tune's error file)"


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key.startswith("acc_") and isinstance(v, float):
        return f"{100 * v:.2f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    if not rows:
        return "(no trials)\n"
    exits = sorted({k for r in rows for k in r if k.startswith("acc_exit_")}, key=lambda s: int(s.rsplit("_", 1)[1]))
    val = any(r.get(VAL_METRIC) is not None for r in rows)
    cols = ["trial_id", "status", *keys, "rounds", *([VAL_METRIC] if val else []), *exits, "acc_avg_exit",
            "acc_worst_client"]
    head = ["trial", "status", *keys, "rounds", *(["val avg exit %"] if val else []),
            *[f"exit {k.rsplit('_', 1)[1]} %" for k in exits], "avg exit %", "worst client %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [_fmt(r.get(c), c) for c in cols]
        key = VAL_METRIC if val else "acc_avg_exit"
        if i == 0 and r.get(key) is not None:
            cells[cols.index(key)] = f"**{cells[cols.index(key)]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], best: dict[str, Any] | None, spec: dict[str, Any],
                  out: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(spec["space"])
    paths = {"results_md": out / "results.md", "results_csv": out / "results.csv",
             "results_parquet": out / "results.parquet", "best_config": out / "best_config.yaml",
             "best_json": out / "best.json"}
    metric = selection_metric(spec["base"])
    note = ("ranked on the validation split; test columns are for reading, not choosing"
            if metric == VAL_METRIC else
            "no validation split (data.val_fraction = 0): ranked on the test split")
    title = (f"# Sweep: {spec['base'].get('name', 'experiment')} ({len(rows)} trials; metric {metric}, "
             f"mode {MODE}, ASHA on {TIME_ATTR}; {note})\n\n")
    paths["results_md"].write_text(title + markdown_table(rows, keys))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with paths["results_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if rows:
        flat = [{c: (json.dumps(r.get(c)) if isinstance(r.get(c), (list, dict)) else r.get(c)) for c in cols}
                for r in rows]
        # swept values may mix ints and floats: store them as one type per column
        for c in keys:
            if any(isinstance(x[c], float) for x in flat):
                for x in flat:
                    if isinstance(x[c], int) and not isinstance(x[c], bool):
                        x[c] = float(x[c])
        pq.write_table(pa.Table.from_pylist(flat), paths["results_parquet"])
    if best is not None:
        params = {k: best[k] for k in keys}
        base = spec["base"]
        cfg = trial_config(base, params, name=f"{base.get('name', 'experiment')}-best")
        header = (f"# Best trial {best['trial_id']} of the sweep in {out}\n"
                  f"# {metric} = {best[metric]:.4f} after {best['rounds']} rounds ({best['status']});\n"
                  f"# swept values: {json.dumps(params)}\n"
                  f"# run it: cafe-ray simulate {paths['best_config']}\n")
        paths["best_config"].write_text(header + dump_config(cfg))
        paths["best_json"].write_text(json.dumps({"trial_id": best["trial_id"], "params": params,
                                                  "metrics": {k: v for k, v in best.items() if k not in params}},
                                                 indent=1, default=_json_default))
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
