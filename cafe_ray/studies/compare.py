"""Comparison studies: methods x settings x seeds, tuned on validation, reported on test.

A study YAML names a base config, a grid of settings (e.g. Dirichlet alpha), the
seeds, and a list of variants (a method or an ablation: a label plus ``--set``
overrides; a variant of group ``upper_bound`` is the centralized Ray Train run on
pooled data). The protocol is the one a reviewer expects:

- **Validation split.** With ``data.val_fraction > 0`` every run also evaluates a
  per-client validation split carved from the client's training data. Tuning and
  the choice of the reference method read it; the test split is read only for
  the final table, and the table says so.
- **Seeds.** ``seeds: [0, 1, 2]``: every (setting, variant) runs once per seed;
  each cell is mean +- std over seeds.
- **Paired comparison.** Every variant is compared with a reference method
  (``reference: best_baseline``, the baseline with the best mean validation
  accuracy in that setting, or a variant label) client by client over clients x
  seeds: wins / losses and a Wilcoxon signed-rank p-value.
- **Equal-budget tuning** (optional ``tuning:``): each variant's knobs (a shared
  ``tuning.space`` plus the variant's own ``tune:`` space) are tuned with Ray Tune
  on validation with the same number of trials for every variant, on one seed;
  the best values are then rerun on every seed.
- **Local compute.** Samples processed per client-round are reported, so methods
  that train two passes per round are visible as such (cap every method with
  ``train.max_steps`` in the base config for equal local steps).

Every (setting, variant, seed) is one simulation in
``OUT/runs/<setting>/seed_<s>/<variant>-<timestamp>``; a finished one
(summary.json present) made with the same resolved config is not run again
(:func:`same_run`), so an interrupted study resumes by running the same command.
A variant's ``run_name`` names its run directories (default: from the label),
so a reworded label keeps its finished runs. Outputs in OUT: results.md, results.json,
results.parquet (one row per setting x variant), runs.parquet (one row per
run), per-exit accuracy bars and accuracy curves (one PNG per setting).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from cafe_ray.config import (
    ConfigError,
    apply_overrides,
    build_config,
    fill_legacy,
)
from cafe_ray.runs import rundir

BEST_BASELINE = "best_baseline"
GROUPS = ("method", "ablation", "baseline", "upper_bound")


@dataclass(frozen=True)
class Variant:
    label: str
    sets: dict[str, Any]
    group: str = "method"  # method | ablation | baseline | upper_bound
    tune: dict[str, Any] = field(default_factory=dict)  # this variant's own knobs to tune
    run_name: str | None = None  # run-directory name (default: from the label); keeps runs when a label changes

    @property
    def slug(self) -> str:
        return self.run_name or _slug(self.label)


@dataclass(frozen=True)
class Tuning:
    """Equal-budget tuning on validation: ``trials`` Tune trials for every variant."""

    trials: int
    seed: int = 0  # tuning runs on this seed only; the best values run on every seed
    space: dict[str, Any] = field(default_factory=dict)  # knobs every variant tunes (e.g. train.lr)
    rounds: int | None = None  # shorter tuning runs (None = the study's rounds)


@dataclass(frozen=True)
class Study:
    base: dict[str, Any]
    grid: dict[str, list[Any] | dict[str, dict[str, Any]]]  # a key's values, or named bundles of sets
    variants: tuple[Variant, ...]
    source: Path
    seeds: tuple[int, ...] = (0,)
    reference: str = BEST_BASELINE
    tuning: Tuning | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


# ------------------------------------------------------------------- loading
def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and check a study: every config of every (setting, variant, seed) must validate.

    ``overrides`` (``key=value``, values as YAML) are applied to the base config.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: cannot read study: {err}") from None
    if not isinstance(raw, dict) or "variants" not in raw:
        raise ConfigError(f"{p}: a study needs 'base' (a config path), 'variants' (list) and optional "
                          "'grid', 'seeds', 'reference', 'tuning'")
    unknown = set(raw) - {"base", "grid", "variants", "seeds", "reference", "tuning"}
    if unknown:
        raise ConfigError(f"{p}: unknown study keys {sorted(unknown)}; allowed: base, grid, variants, "
                          "seeds, reference, tuning")
    base_path = (p.parent / raw.get("base", "")).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{p}: base config {base_path} not found")
    base = apply_overrides(yaml.safe_load(base_path.read_text()) or {}, list(overrides or []))
    variants = []
    for i, v in enumerate(raw["variants"]):
        if not isinstance(v, dict) or "label" not in v:
            raise ConfigError(f"{p}: variants[{i}] needs a 'label' and a 'set' mapping")
        extra = set(v) - {"label", "set", "group", "tune", "run_name"}
        if extra:
            raise ConfigError(f"{p}: variants[{i}] ({v['label']}): unknown keys {sorted(extra)}; "
                              "allowed: label, set, group, tune, run_name")
        run_name = v.get("run_name")
        if run_name is not None and (not isinstance(run_name, str) or _slug(run_name) != run_name):
            raise ConfigError(f"{p}: variants[{i}].run_name={run_name!r}: use letters, digits, '-', '_' "
                              f"and '.' only, e.g. {_slug(str(run_name))!r}")
        group = str(v.get("group", "method"))
        if group not in GROUPS:
            raise ConfigError(f"{p}: variants[{i}].group={group!r}: use one of {', '.join(GROUPS)}")
        variants.append(Variant(str(v["label"]), dict(v.get("set") or {}), group, dict(v.get("tune") or {}),
                                run_name))
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{p}: variant labels must be unique, got duplicates in {labels}")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"{p}: two variants would share a run directory name ({slugs}); set run_name")
    grid: dict[str, Any] = {}
    for k, vs in (raw.get("grid") or {}).items():
        if isinstance(vs, dict):  # a named axis: {fleet: {small: {sets...}, large: {sets...}}}
            if not vs or not all(isinstance(b, dict) for b in vs.values()):
                raise ConfigError(f"{p}: grid.{k}: a named axis maps names to mappings of config keys, "
                                  "e.g. {fleet: {small: {data.num_clients: 20}, large: {data.num_clients: 100}}}")
            grid[str(k)] = {str(n): dict(b) for n, b in vs.items()}
        elif isinstance(vs, list) and vs:
            grid[str(k)] = list(vs)
        else:
            raise ConfigError(f"{p}: grid.{k}: give a non-empty list of values or a mapping of named bundles")
    seeds = raw.get("seeds", [base.get("seed", 0)])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{p}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    reference = str(raw.get("reference", BEST_BASELINE))
    if reference != BEST_BASELINE and reference not in labels:
        raise ConfigError(f"{p}: reference={reference!r} is not a variant label; use '{BEST_BASELINE}' "
                          f"or one of {labels}")
    if reference == BEST_BASELINE and not any(v.group == "baseline" for v in variants):
        reference = ""  # nothing to compare with: no paired columns
    tuning = _load_tuning(p, raw.get("tuning"), variants)
    study = Study(base, grid, tuple(variants), p, tuple(seeds), reference, tuning)
    for setting in settings(study):  # fail fast: every config must validate
        for v in study.variants:
            cfg = config_for(study, setting, v, Path("/nonexistent"), study.seeds[0])
            if tuning is not None and v.group != "upper_bound" and cfg.data.val_fraction <= 0:
                raise ConfigError(f"{p}: tuning needs a validation split: set data.val_fraction (e.g. 0.15) "
                                  "in the base config; tuning on the test split is not allowed")
    return study


def _load_tuning(p: Path, raw: Any, variants: list[Variant]) -> Tuning | None:
    from cafe_ray.studies.sweep import check_space

    if raw is None:
        if any(v.tune for v in variants):
            raise ConfigError(f"{p}: a variant has a 'tune' space but the study has no 'tuning: {{trials: N}}'")
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("trials"), int) or raw["trials"] < 1:
        raise ConfigError(f"{p}: tuning needs 'trials' (a positive integer: the trials every variant gets)")
    extra = set(raw) - {"trials", "seed", "space", "rounds"}
    if extra:
        raise ConfigError(f"{p}: tuning: unknown keys {sorted(extra)}; allowed: trials, seed, space, rounds")
    common = check_space(raw["space"], f"{p} tuning.space") if raw.get("space") else {}
    for v in [None, *variants]:
        space = common if v is None else (check_space(v.tune, f"{p} variant {v.label} tune") if v.tune else {})
        grids = [k for k, s in space.items() if isinstance(s, dict) and "grid" in s]
        if grids:
            where = "tuning.space" if v is None else f"variant {v.label} tune"
            raise ConfigError(f"{p}: {where}: {grids} use 'grid', which multiplies the trials; use 'choice' "
                              "so every variant gets exactly tuning.trials trials")
    rounds = raw.get("rounds")
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"{p}: tuning.rounds must be a positive integer or null, got {rounds!r}")
    return Tuning(int(raw["trials"]), int(raw.get("seed", 0)), common, rounds)


def settings(study: Study) -> list[dict[str, Any]]:
    """Every grid combination; a named axis contributes its bundle names."""
    keys = list(study.grid)
    axes = [list(v) if isinstance(v, dict) else v for v in study.grid.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)] or [{}]


def setting_sets(study: Study, setting: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of one setting (named bundles expanded)."""
    out: dict[str, Any] = {}
    for k, val in setting.items():
        axis = study.grid.get(k)
        out.update(axis[val] if isinstance(axis, dict) else {k: val})
    return out


def setting_name(setting: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "default"


def raw_config(study: Study, setting: dict[str, Any], v: Variant, seed: int,
               tuned: dict[str, Any] | None = None) -> dict[str, Any]:
    """The raw config mapping of one run (setting, variant's sets, tuned values, seed)."""
    sets = [f"{k}={json.dumps(val)}" for k, val in {**setting_sets(study, setting), **v.sets,
                                                     **(tuned or {})}.items()]
    raw = apply_overrides(study.base, sets)
    raw["seed"] = seed
    raw["name"] = v.slug
    return raw


def config_for(study: Study, setting: dict[str, Any], v: Variant, out: Path, seed: int | None = None,
               tuned: dict[str, Any] | None = None):
    seed = study.seeds[0] if seed is None else seed
    raw = raw_config(study, setting, v, seed, tuned)
    raw["output_dir"] = str(out / "runs" / _slug(setting_name(setting)) / f"seed_{seed}")
    return build_config(raw, f"{study.source} [{setting_name(setting)} / {v.label} / seed {seed}]")


def _algorithm_section(name: str) -> str:
    """The ``algorithm.*`` section of an algorithm's hyperparameters (fedrod_ee -> fedrod)."""
    return name.removesuffix("_ee")


def _relevant(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump without what cannot change the run's metrics.

    That is the hyperparameter sections of algorithms the run does not use, and the
    executor (the sequential and the Ray executor give the same metrics, tested bit for
    bit), so a run made in-process is reused by a study run on Ray and back.
    """
    alg = dict(dump["algorithm"])
    own = _algorithm_section(alg["name"])
    dump = {k: v for k, v in dump.items() if k != "executor"}
    dump["algorithm"] = {k: v for k, v in alg.items() if not isinstance(v, dict) or k == own}
    return dump


def _missing_keys(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``now`` that the saved mapping lacks (fields added after the run was made)."""
    if not isinstance(now, dict):
        return []
    if not isinstance(saved, dict):
        return [prefix.rstrip(".")]
    out: list[str] = []
    for k, v in now.items():
        out += [f"{prefix}{k}"] if k not in saved else _missing_keys(saved[k], v, f"{prefix}{k}.")
    return out


def same_run(path: Path, cfg: Any) -> bool:
    """Whether the finished run at ``path`` was made with ``cfg``, as far as the run can tell.

    A run made by another cafe-ray version (its ``provenance.json``) is never reused:
    the cache must not mix numbers of different code. Sections of other algorithms are
    ignored (a default changed there cannot change this run). A field that the run's saved config predates takes the value that
    ``config.LEGACY_VALUES`` says reproduces such runs; any other field of the run's
    own algorithm that the saved config lacks makes it stale (the run used whatever
    that field's behaviour was then).
    """
    made = rundir.read_provenance(path)
    if made is not None and made.get("cafe_ray") != rundir.provenance()["cafe_ray"]:
        return False  # another version of the code made it: its numbers need not be this version's
    cfg_file = path / rundir.CONFIG
    try:
        raw = fill_legacy(yaml.safe_load(cfg_file.read_text()) or {})
        saved = build_config(raw, str(cfg_file))
    except (ConfigError, OSError, yaml.YAMLError):
        return False
    now = cfg.model_dump(mode="json")
    if _relevant(saved.model_dump(mode="json")) != _relevant(now):
        return False
    section = _algorithm_section(cfg.algorithm.name)
    saved_section = (raw.get("algorithm") or {}).get(section, {})
    return not _missing_keys(saved_section, now["algorithm"].get(section, {}))


def _find_done(run_parent: Path, name: str, cfg: Any = None) -> Path | None:
    """The latest finished run of this variant made with ``cfg`` (:func:`same_run`).

    A run made with other settings (say, before a default changed) is not reused.
    """
    done = sorted(p for p in run_parent.glob(f"{name}-*") if rundir.is_finished(p))
    if cfg is not None:
        done = [p for p in done if same_run(p, cfg)]
    return done[-1] if done else None


# ------------------------------------------------------------------- running
def run_study(path: str | Path, out: str | Path, *, only: list[str] | None = None,
              only_settings: list[str] | None = None, address: str | None = None,
              console: Console | None = None, jobs: int = 1,
              overrides: list[str] | None = None, trust_pickles: bool = False) -> list[dict[str, Any]]:
    """Tune (if asked), run every missing (setting, variant, seed); return one row per cell.

    ``only`` (variant labels) and ``only_settings`` (setting names such as
    ``fleet=full20,alpha=0.1``) limit what runs; the table still shows every finished run.
    ``overrides`` (``key=value``) apply to the base config of every run (a variant's own
    sets still win), e.g. ``executor=sequential``. ``jobs`` > 1 runs that many simulations at once, each in its
    own ``cafe-ray simulate`` process (use it with ``executor=sequential``: one core each).
    """
    from cafe_ray.sim.engine import run_simulation

    console = console or Console()
    study = load_study(path, overrides)
    out = Path(out)
    names = [setting_name(s) for s in settings(study)]
    bad = sorted(set(only_settings or []) - set(names))
    if bad:
        raise ConfigError(f"--setting {bad}: not a setting of {path}; the settings are {names}")
    labels = [v.label for v in study.variants]
    bad = sorted(set(only or []) - set(labels))
    if bad:
        raise ConfigError(f"--only {bad}: not a variant label of {path}; the labels are {labels}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    out.mkdir(parents=True, exist_ok=True)
    cells: list[tuple[dict[str, Any], Variant, int, Any, dict[str, Any], bool]] = []
    for setting in settings(study):
        skip_setting = bool(only_settings) and setting_name(setting) not in (only_settings or [])
        for v in study.variants:
            skip = skip_setting or bool(only) and v.label not in (only or [])
            tuned: dict[str, Any] = {}
            if study.tuning is not None and v.group != "upper_bound" and not skip:
                tuned = tune_variant(study, setting, v, out, address=address, console=console,
                                     trust_pickles=trust_pickles)
            elif study.tuning is not None and v.group != "upper_bound":
                tuned = _read_tuned(study, setting, v, out)
            for seed in study.seeds:
                cells.append((setting, v, seed, config_for(study, setting, v, out, seed, tuned), tuned, skip))
    pending: list[tuple[str, Any]] = []
    for setting, v, seed, cfg, _tuned, skip in cells:
        # --only limits what runs; the table still shows every finished run
        parent = Path(cfg.output_dir)
        done = _find_done(parent, cfg.name, cfg)
        where = f"{setting_name(setting)} / {v.label} / seed {seed}"
        if skip or done is not None:
            if done is not None and not skip:
                console.print(f"[dim]cached[/] {where} ({done})")
            continue
        if jobs > 1 and v.group != "upper_bound":
            pending.append((where, cfg))
            continue
        t0 = time.perf_counter()
        if v.group == "upper_bound":  # Ray Train on the pooled data (cafe_ray.studies.centralized)
            from cafe_ray.sim.engine import ensure_ray
            from cafe_ray.studies.centralized import run_centralized

            ensure_ray(address)
            done, _ = run_centralized(cfg, out=parent / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        else:
            done, _ = run_simulation(cfg, address=address, console=Console(quiet=True), show_progress=False)
        console.print(f"[green]done[/] {where} in {time.perf_counter() - t0:.0f}s -> {done}")
    if pending:
        _run_parallel(pending, jobs, out, address, console)
    runs: list[dict[str, Any]] = []
    for setting, v, seed, cfg, tuned, _skip in cells:
        done = _find_done(Path(cfg.output_dir), cfg.name, cfg)
        if done is not None:
            runs.append(run_row(setting, v, seed, done, tuned))
    rows = aggregate(runs, study.reference)
    write_outputs(rows, out, runs)
    return rows


def _run_parallel(pending: list[tuple[str, Any]], jobs: int, out: Path, address: str | None,
                  console: Console) -> None:
    """Run ``pending`` simulations ``jobs`` at a time, each one a ``cafe-ray simulate`` process.

    Each run's resolved config is written to OUT/configs/ and its output to a log beside
    it; a run that fails is reported with its log and the study goes on (its cell stays
    empty, and the next invocation of the same command retries it).
    """
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from cafe_ray.config import dump_config

    cdir = out / "configs"
    cdir.mkdir(parents=True, exist_ok=True)

    def one(item: tuple[str, Any]) -> None:
        where, cfg = item
        stem = _slug(where.replace(" / ", "__"))
        cfg_path, log = cdir / f"{stem}.yaml", cdir / f"{stem}.log"
        cfg_path.write_text(dump_config(cfg))
        cmd = [sys.executable, "-m", "cafe_ray.cli", "simulate", str(cfg_path), "--no-progress"]
        if address:
            cmd += ["--address", address]
        t0 = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        if rc == 0:
            console.print(f"[green]done[/] {where} in {time.perf_counter() - t0:.0f}s")
        else:
            console.print(f"[red]failed[/] {where} (exit {rc}); see {log}")

    console.print(f"running {len(pending)} simulations, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, pending))


def _tuning_dir(setting: dict[str, Any], v: Variant, out: Path) -> Path:
    return out / "tuning" / _slug(setting_name(setting)) / v.slug


def _read_tuned(study: Study, setting: dict[str, Any], v: Variant, out: Path) -> dict[str, Any]:
    p = _tuning_dir(setting, v, out) / "best.json"
    return dict(json.loads(p.read_text())["params"]) if p.is_file() else {}


def tune_variant(study: Study, setting: dict[str, Any], v: Variant, out: Path, *,
                 address: str | None = None, console: Console | None = None,
                 trust_pickles: bool = False) -> dict[str, Any]:
    """Tune one variant on validation with the study's trial budget; return its best values.

    Resumable: a finished tuning (best.json) is read back, an interrupted one continues.
    """
    from cafe_ray.sim.engine import ensure_ray
    from cafe_ray.studies.sweep import run_sweep

    assert study.tuning is not None
    space = {**study.tuning.space, **v.tune}
    if not space:
        return {}
    tdir = _tuning_dir(setting, v, out)
    if (tdir / "best.json").is_file():
        return _read_tuned(study, setting, v, out)
    raw = raw_config(study, setting, v, study.tuning.seed)
    if study.tuning.rounds is not None:
        raw.setdefault("round", {})["num_rounds"] = study.tuning.rounds
    ensure_ray(address)
    t0 = time.perf_counter()
    res = run_sweep(raw, space, tdir, samples=study.tuning.trials, resume=(tdir / "sweep.json").is_file(),
                    verbose=0, trust_pickles=trust_pickles)
    if res.best is None:
        raise RuntimeError(f"tuning {setting_name(setting)} / {v.label}: no trial reported a result; "
                           f"see {tdir / 'results.md'}")
    best = {k: res.best[k] for k in space}
    if console is not None:
        console.print(f"[green]tuned[/] {setting_name(setting)} / {v.label} "
                      f"({study.tuning.trials} trials, {time.perf_counter() - t0:.0f}s): {best}")
    return best


# ------------------------------------------------------------------- reading
def per_client_accuracy(run_dir: Path) -> dict[int, float]:
    """Each client's mean-over-exits test accuracy at the run's last evaluation."""
    return {c: float(np.mean(accs)) for c, accs in rundir.last_eval(run_dir).items() if accs}


def samples_per_client_round(run_dir: Path) -> float | None:
    """Mean samples processed per completed client-round (local compute, all passes)."""
    recs = [r["samples"] for r in rundir.read_jsonl(run_dir / rundir.CLIENTS)
            if r.get("status") in ("ok", "late") and r.get("samples") is not None]
    return float(np.mean(recs)) if recs else None


def _made_by(run_dir: Path) -> str | None:
    """'cafe-ray VERSION (COMMIT[, with local changes])' from the run's provenance, if recorded."""
    made = rundir.read_provenance(run_dir)
    if made is None:
        return None
    text = f"cafe-ray {made.get('cafe_ray')}"
    if made.get("git_commit"):
        text += f" ({made['git_commit'][:10]}{', with local changes' if made.get('git_dirty') else ''})"
    return text


def run_row(setting: dict[str, Any], v: Variant, seed: int, run_dir: Path,
            tuned: dict[str, Any] | None = None) -> dict[str, Any]:
    """One finished run as a row: final metrics, per-client accuracy, curve, cost."""
    s = rundir.read_summary(run_dir)
    curve = [(r["round"] + 1, r["acc_avg_exit"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS)
             if r.get("acc_avg_exit") is not None]
    return {
        "setting": setting_name(setting), "label": v.label, "group": v.group, "seed": seed,
        "algorithm": s["algorithm"], "acc_exit": s["acc_exit"], "acc_avg_exit": s["acc_avg_exit"],
        "acc_worst_client": s["acc_worst_client"], "val_acc_avg_exit": s.get("val_acc_avg_exit"),
        "cum_bytes": s["cum_bytes_down"] + s["cum_bytes_up"],
        "samples_per_client_round": samples_per_client_round(run_dir),
        "wall_time_s": s["wall_time_s"], "virtual_time_s": s["virtual_time_s"],
        "tuned": dict(tuned or {}), "run_dir": str(run_dir), "curve": curve, "made_by": _made_by(run_dir),
        "per_client": per_client_accuracy(run_dir),
    }


# ---------------------------------------------------------------- statistics
def paired_comparison(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any]:
    """a vs b over their common keys (client x seed): wins, losses, ties, mean diff, Wilcoxon p.

    Two-sided Wilcoxon signed-rank test on the paired differences (ties dropped, the
    'wilcox' convention); p is None with fewer than one non-zero difference and 1.0
    when every pair ties.
    """
    from scipy.stats import wilcoxon

    keys = sorted(set(a) & set(b), key=str)
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    eps = 1e-12
    wins, losses = int((d > eps).sum()), int((d < -eps).sum())
    nz = d[np.abs(d) > eps]
    if not keys:
        p = None
    elif nz.size == 0:
        p = 1.0
    else:
        p = float(wilcoxon(nz, zero_method="wilcox", alternative="two-sided").pvalue)
    return {"n": len(keys), "wins": wins, "losses": losses, "ties": len(keys) - wins - losses,
            "mean_diff": float(d.mean()) if keys else None, "p_value": p}


def _mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]], reference: str = BEST_BASELINE) -> list[dict[str, Any]]:
    """One row per (setting, variant): mean +- std over seeds and the paired test vs the reference.

    With ``best_baseline`` the reference is, per setting, the baseline with the best mean
    *validation* accuracy (test accuracy only when the runs have no validation split).
    """
    rows: list[dict[str, Any]] = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        part = [r for r in runs if r["setting"] == setting]
        cells: dict[str, list[dict[str, Any]]] = {}
        for r in part:
            cells.setdefault(r["label"], []).append(r)
        srows = []
        for label, rs in cells.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            m = max(len(r["acc_exit"] or []) for r in rs)
            row: dict[str, Any] = {"setting": setting, "label": label, "group": rs[0]["group"],
                                   "algorithm": rs[0]["algorithm"], "seeds": [r["seed"] for r in rs],
                                   "tuned": rs[0]["tuned"], "run_dirs": [r["run_dir"] for r in rs]}
            mean_exit, std_exit = [], []
            for k in range(m):
                mu, sd = _mean_std([r["acc_exit"][k] if r["acc_exit"] else None for r in rs])
                mean_exit.append(mu)
                std_exit.append(sd)
            row["acc_exit"], row["acc_exit_std"] = mean_exit, std_exit
            for key in ("acc_avg_exit", "acc_worst_client", "val_acc_avg_exit", "cum_bytes",
                        "samples_per_client_round", "wall_time_s"):
                row[key], row[f"{key}_std"] = _mean_std([r.get(key) for r in rs])
            row["per_client"] = {(r["seed"], c): a for r in rs for c, a in r["per_client"].items()}
            row["curve"] = _mean_curve([r["curve"] for r in rs])
            srows.append(row)
        ref = _pick_reference(srows, reference)
        for row in srows:
            row["reference"] = ref["label"] if ref is not None else None
            if ref is not None and row is not ref:
                row["paired"] = paired_comparison(row["per_client"], ref["per_client"])
            else:
                row["paired"] = None
        rows += srows
    return rows


def _pick_reference(rows: list[dict[str, Any]], reference: str) -> dict[str, Any] | None:
    if not reference:
        return None
    if reference != BEST_BASELINE:
        return next((r for r in rows if r["label"] == reference), None)
    base = [r for r in rows if r["group"] == "baseline" and r["acc_avg_exit"] is not None]
    if not base:
        return None
    key = "val_acc_avg_exit" if all(r["val_acc_avg_exit"] is not None for r in base) else "acc_avg_exit"
    return max(base, key=lambda r: r[key])


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_round: dict[int, list[float]] = {}
    for c in curves:
        for t, a in c:
            by_round.setdefault(int(t), []).append(float(a))
    return [(t, float(np.mean(v))) for t, v in sorted(by_round.items()) if len(v) == len(curves)]


# ------------------------------------------------------------------- writing
def _pm(mu: float | None, sd: float | None, scale: float = 100.0, digits: int = 2) -> str:
    if mu is None:
        return "-"
    return f"{scale * mu:.{digits}f}" + (f" ± {scale * sd:.{digits}f}" if sd else "")


def _paired_cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "(reference)"
    pv = "-" if p["p_value"] is None else (f"{p['p_value']:.1e}" if p["p_value"] < 1e-3 else f"{p['p_value']:.3f}")
    return f"{p['wins']}/{p['losses']} (p={pv})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table per setting, mean +- std over seeds of the test split; paired vs the reference."""
    out: list[str] = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting]
        m = max(len(r["acc_exit"] or []) for r in part)
        seeds = max(len(r["seeds"]) for r in part)
        ref = part[0].get("reference")
        has_val = any(r.get("val_acc_avg_exit") is not None for r in part)
        note = [f"{seeds} seed{'s' if seeds > 1 else ''}, mean ± std; accuracy on each client's test split"]
        if has_val:
            note.append("validation columns and the reference choice read the validation split only")
        if ref:
            note.append(f"paired: wins/losses over clients x seeds vs **{ref}**, Wilcoxon signed-rank p")
        out.append(f"**{setting}** ({'; '.join(note)})\n")
        head = ["method", *[f"exit {k + 1}" for k in range(m)], "avg exit", "worst client"]
        head += (["val avg exit"] if has_val else []) + ([f"vs {ref}"] if ref else [])
        head += ["MB up+down", "samples / client-round", "wall s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in part:
            accs = [_pm(a, s) for a, s in zip(r["acc_exit"], r["acc_exit_std"], strict=True)]
            accs += ["-"] * (m - len(accs))
            label = r["label"] if len(r["seeds"]) == seeds else f"{r['label']} ({len(r['seeds'])} of {seeds} seeds)"
            cells = [label, *accs, f"**{_pm(r['acc_avg_exit'], r['acc_avg_exit_std'])}**",
                     _pm(r["acc_worst_client"], r["acc_worst_client_std"])]
            if has_val:
                cells.append(_pm(r["val_acc_avg_exit"], r["val_acc_avg_exit_std"]))
            if ref:
                cells.append(_paired_cell(r["paired"]))
            spr = r["samples_per_client_round"]
            cells += [f"{r['cum_bytes'] / 1e6:.1f}" if r["cum_bytes"] is not None else "-",
                      f"{spr:.0f}" if spr is not None else "-",
                      f"{r['wall_time_s']:.0f}" if r["wall_time_s"] is not None else "-"]
            out.append("| " + " | ".join(cells) + " |")
        tuned = [r for r in part if r.get("tuned")]
        if tuned:
            out.append("")
            out.append("Tuned on validation (seed of the tuning runs only): " + "; ".join(
                f"{r['label']}: " + ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["tuned"].items())
                for r in tuned))
        out.append("")
    return "\n".join(out)


def _p_text(p: float | None) -> str:
    return "-" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Variants x settings in one table: the test average exit accuracy (mean over seeds) and,
    in brackets, the paired per-client mean difference to the setting's reference with its p.

    The last two columns average the test and validation accuracies over the settings
    (only for a variant that has every setting).
    """
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    by = {(r["setting"], r["label"]): r for r in rows}
    head = ["method", *settings, "mean test", "mean val"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refs = [next((r["reference"] for r in rows if r["setting"] == s and r.get("reference")), None) for s in settings]
    if any(refs):
        out.append("| *reference* | " + " | ".join(f"*{r}*" if r else "-" for r in refs) + " | | |")
    for label in dict.fromkeys(r["label"] for r in rows):
        cells, tests, vals = [label], [], []
        for s in settings:
            r = by.get((s, label))
            if r is None or r["acc_avg_exit"] is None:
                cells.append("-")
                continue
            cell = f"{100 * r['acc_avg_exit']:.2f}"
            p = r.get("paired")
            if p and p.get("mean_diff") is not None:
                cell += f" ({100 * p['mean_diff']:+.2f}, p={_p_text(p['p_value'])})"
            cells.append(cell)
            tests.append(r["acc_avg_exit"])
            vals.append(r.get("val_acc_avg_exit"))
        full = len(tests) == len(settings)
        cells.append(f"{100 * float(np.mean(tests)):.2f}" if full else "-")
        cells.append(f"{100 * float(np.mean(vals)):.2f}" if full and all(v is not None for v in vals) else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    r = dict(row)
    if isinstance(r.get("per_client"), dict):
        r["per_client"] = {f"{k[0]}:{k[1]}" if isinstance(k, tuple) else str(k): v
                           for k, v in r["per_client"].items()}
    return r


def write_outputs(rows: list[dict[str, Any]], out: Path, runs: list[dict[str, Any]] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    summary = ("## Summary\n\nTest average exit accuracy (%), mean over seeds; in brackets the paired per-client "
               "mean difference to the setting's reference (points) and its Wilcoxon p. The last columns average "
               "the settings, on test and on validation.\n\n" + summary_table(rows) + "\n\n## Per setting\n\n")
    (out / "results.md").write_text(summary + markdown_table(rows))
    (out / "results.json").write_text(json.dumps([_jsonable(r) for r in rows], indent=1))

    def flat(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in _jsonable(r).items()}
                for r in rs]

    pq.write_table(pa.Table.from_pylist(flat(rows)), out / "results.parquet")
    if runs:
        pq.write_table(pa.Table.from_pylist(flat(runs)), out / "runs.parquet")
    _plots(rows, out)


def _plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting and r["acc_exit"] and None not in r["acc_exit"]]
        if not part:
            continue
        m = max(len(r["acc_exit"]) for r in part)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.5))
        width = 0.8 / m
        x = np.arange(len(part))
        for k in range(m):
            ax1.bar(x + k * width, [100 * r["acc_exit"][k] if k < len(r["acc_exit"]) else 0 for r in part], width,
                    yerr=[100 * (r["acc_exit_std"][k] or 0) if k < len(r["acc_exit"]) else 0 for r in part],
                    capsize=2, label=f"exit {k + 1}")
        ax1.set_xticks(x + width * (m - 1) / 2)
        ax1.set_xticklabels([r["label"] for r in part], rotation=60, ha="right", fontsize=8)
        ax1.set_ylabel("test accuracy (%), mean ± std over seeds")
        lo = min(100 * min(r["acc_exit"]) for r in part)
        ax1.set_ylim(max(0, lo - 10), 100)
        ax1.legend(fontsize=8)
        ax1.set_title(f"per-exit accuracy ({setting})")
        ax1.grid(axis="y", alpha=0.3)
        for r in part:
            if r["curve"]:
                rs, accs = zip(*r["curve"], strict=True)
                ax2.plot(rs, [100 * a for a in accs], marker="o", ms=3, label=r["label"],
                         lw=2.5 if r["algorithm"] == "cafedistill" and r["group"] == "method" else 1)
        ax2.set_xlabel("round")
        ax2.set_ylabel("average exit accuracy (%), mean over seeds")
        ax2.set_title(f"average exit accuracy over rounds ({setting})")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=1, bbox_to_anchor=(1.01, 1.0), loc="upper left")
        fig.tight_layout()
        fig.savefig(out / f"comparison_{_slug(setting)}.png", dpi=110)
        plt.close(fig)
