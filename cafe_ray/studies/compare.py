"""Run a comparison study (methods x settings) and write its table and plots.

A study YAML names a base config, a grid of settings (e.g. Dirichlet alpha) and a
list of variants (a method or an ablation: a label plus ``--set`` overrides; a
variant of group ``upper_bound`` is the centralized Ray Train run on pooled data).
Every (setting, variant) is one simulation in ``OUT/runs/<setting>/<variant>``; a
finished one (summary.json present) is not run again, so an interrupted study
resumes by running the same command.

Outputs in OUT: results.md, results.parquet, results.json, per-exit accuracy bars
and average-exit-accuracy curves (one PNG per setting).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from cafe_ray.config import ConfigError, apply_overrides, build_config
from cafe_ray.runs import rundir


@dataclass(frozen=True)
class Variant:
    label: str
    sets: dict[str, Any]
    group: str = "method"  # method | ablation | baseline | upper_bound


@dataclass(frozen=True)
class Study:
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: tuple[Variant, ...]
    source: Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def load_study(path: str | Path) -> Study:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: cannot read study: {err}") from None
    if not isinstance(raw, dict) or "variants" not in raw:
        raise ConfigError(f"{p}: a study needs 'base' (a config path), 'variants' (list) and optional 'grid'")
    base_path = (p.parent / raw.get("base", "")).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{p}: base config {base_path} not found")
    base = yaml.safe_load(base_path.read_text()) or {}
    variants = []
    for i, v in enumerate(raw["variants"]):
        if not isinstance(v, dict) or "label" not in v:
            raise ConfigError(f"{p}: variants[{i}] needs a 'label' and a 'set' mapping")
        variants.append(Variant(str(v["label"]), dict(v.get("set") or {}), str(v.get("group", "method"))))
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{p}: variant labels must be unique, got duplicates in {labels}")
    grid = {str(k): list(vs) for k, vs in (raw.get("grid") or {}).items()}
    study = Study(base, grid, tuple(variants), p)
    for setting in settings(study):  # fail fast: every config must validate
        for v in study.variants:
            config_for(study, setting, v, Path("/nonexistent"))
    return study


def settings(study: Study) -> list[dict[str, Any]]:
    keys = list(study.grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*study.grid.values())] or [{}]


def setting_name(setting: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "default"


def config_for(study: Study, setting: dict[str, Any], v: Variant, out: Path):  # noqa: ANN201
    sets = [f"{k}={json.dumps(val)}" for k, val in {**setting, **v.sets}.items()]
    raw = apply_overrides(study.base, sets)
    raw["name"] = _slug(v.label)
    raw["output_dir"] = str(out / "runs" / _slug(setting_name(setting)))
    return build_config(raw, f"{study.source} [{setting_name(setting)} / {v.label}]")


def _find_done(run_parent: Path, name: str) -> Path | None:
    done = sorted(p for p in run_parent.glob(f"{name}-*") if rundir.is_finished(p))
    return done[-1] if done else None


def run_study(path: str | Path, out: str | Path, *, only: list[str] | None = None,
              address: str | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Run every missing (setting, variant); return one result row per pair."""
    from cafe_ray.sim.engine import run_simulation

    console = console or Console()
    study = load_study(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for setting in settings(study):
        for v in study.variants:
            cfg = config_for(study, setting, v, out)
            parent = Path(cfg.output_dir)
            done = _find_done(parent, cfg.name)
            if only and v.label not in only:
                # --only limits what runs; the table still shows every finished run
                if done is not None:
                    rows.append(_row(setting, v, done))
                continue
            if done is None:
                t0 = time.perf_counter()
                if v.group == "upper_bound":  # Ray Train on the pooled data (cafe_ray.studies.centralized)
                    from cafe_ray.sim.engine import ensure_ray
                    from cafe_ray.studies.centralized import run_centralized

                    ensure_ray(address)
                    done, _ = run_centralized(cfg, out=parent / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                else:
                    done, _ = run_simulation(cfg, address=address, console=Console(quiet=True),
                                             show_progress=False)
                console.print(f"[green]done[/] {setting_name(setting)} / {v.label} "
                              f"in {time.perf_counter() - t0:.0f}s -> {done}")
            else:
                console.print(f"[dim]cached[/] {setting_name(setting)} / {v.label} ({done})")
            rows.append(_row(setting, v, done))
    write_outputs(rows, out)
    return rows


def _row(setting: dict[str, Any], v: Variant, run_dir: Path) -> dict[str, Any]:
    s = rundir.read_summary(run_dir)
    curve = [(r["round"] + 1, r["acc_avg_exit"]) for r in rundir.read_jsonl(run_dir / rundir.METRICS)
             if r.get("acc_avg_exit") is not None]
    return {
        "setting": setting_name(setting), "label": v.label, "group": v.group,
        "algorithm": s["algorithm"], "acc_exit": s["acc_exit"], "acc_avg_exit": s["acc_avg_exit"],
        "acc_worst_client": s["acc_worst_client"],
        "cum_bytes": s["cum_bytes_down"] + s["cum_bytes_up"],
        "cum_bytes_down": s["cum_bytes_down"], "cum_bytes_up": s["cum_bytes_up"],
        "wall_time_s": s["wall_time_s"], "virtual_time_s": s["virtual_time_s"],
        "run_dir": str(run_dir), "curve": curve,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table per setting: per-exit accuracy, mean over exits, worst client, traffic."""
    out: list[str] = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting]
        m = max(len(r["acc_exit"] or []) for r in part)
        out.append(f"**{setting}**\n")
        head = ["method", *[f"exit {k + 1}" for k in range(m)], "avg exit", "worst client", "MB up+down", "wall s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in part:
            accs = [f"{100 * a:.2f}" for a in (r["acc_exit"] or [])]
            out.append("| " + " | ".join([
                r["label"], *accs, f"**{100 * r['acc_avg_exit']:.2f}**", f"{100 * r['acc_worst_client']:.2f}",
                f"{r['cum_bytes'] / 1e6:.1f}", f"{r['wall_time_s']:.0f}"]) + " |")
        out.append("")
    return "\n".join(out)


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    (out / "results.md").write_text(markdown_table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    flat = [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    pq.write_table(pa.Table.from_pylist(flat), out / "results.parquet")
    _plots(rows, out)


def _plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for setting in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == setting and r["acc_exit"]]
        if not part:
            continue
        m = max(len(r["acc_exit"]) for r in part)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.5))
        width = 0.8 / m
        x = np.arange(len(part))
        for k in range(m):
            ax1.bar(x + k * width, [100 * r["acc_exit"][k] for r in part], width, label=f"exit {k + 1}")
        ax1.set_xticks(x + width * (m - 1) / 2)
        ax1.set_xticklabels([r["label"] for r in part], rotation=60, ha="right", fontsize=8)
        ax1.set_ylabel("test accuracy (%)")
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
        ax2.set_ylabel("average exit accuracy (%)")
        ax2.set_title(f"average exit accuracy over rounds ({setting})")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=1, bbox_to_anchor=(1.01, 1.0), loc="upper left")
        fig.tight_layout()
        fig.savefig(out / f"comparison_{_slug(setting)}.png", dpi=110)
        plt.close(fig)
