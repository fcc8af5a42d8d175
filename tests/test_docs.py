"""The documentation stays true to the code: every config field is described, the
configuration page is generated from the config model, every page is in the site's nav,
and the README's links point at files that exist."""

from __future__ import annotations

import importlib.util
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

import cafe_ray.config as config_module
from cafe_ray.cli import app
from cafe_ray.commands.reference import config_reference_markdown, field_docs, iter_fields
from cafe_ray.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _walk(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    """(path, description) of every field, recursively through nested models, written
    independently of the generator so that a generator bug cannot hide a missing one."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append((path, info.description))
        pending: list[Any] = [info.annotation]
        while pending:
            ann = pending.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += _walk(ann, f"{path}.")
            elif typing.get_origin(ann) in (typing.Union, types.UnionType, dict, list, tuple):
                pending += [a for a in typing.get_args(ann) if a is not Ellipsis]
    return out


def test_every_config_field_has_a_description() -> None:
    fields = _walk(ExperimentConfig)
    assert len(fields) > 60
    paths = {p for p, _ in fields}
    assert {"data.partition.alpha", "profiles.classes.num_cpus", "algorithm.cafedistill.selection.order"} <= paths
    missing = sorted(p for p, d in fields if not (d and d.strip()))
    assert not missing, (
        f"config fields without a description: {missing}; give each a "
        "Field(..., description=...) in cafe_ray/config.py (it becomes docs/configuration.md)"
    )


def test_reference_lists_every_leaf_with_default_and_type() -> None:
    md = config_reference_markdown()
    leaves = field_docs(ExperimentConfig)
    for f in leaves:
        row = next((line for line in md.splitlines() if line.startswith(f"| `{f.path}` |")), None)
        assert row is not None, f"{f.path} missing from the reference"
        assert row.count(" | ") >= 3 and f.default in row
    # nested models behind a dict are reached, with a placeholder for the key
    assert "| `profiles.classes.<class>.num_cpus` |" in md
    # constraints and literal choices come from the model, not from prose
    assert re.search(r"\| `data\.num_clients` \| int \(>= 1\) \| `10` \|", md)
    assert "`dirichlet`" in md and "`shards`" in md
    # every iter_fields path that is not a section shows up as a row
    assert {p for p, _ in iter_fields(ExperimentConfig)} >= {f.path for f in leaves}


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(3, ge=1, description="an inner knob")
    mode: Literal["a", "b"] = "a"  # deliberately undocumented


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: _Inner = Field(_Inner(), description="the inner section")
    rate: float | None = Field(None, gt=0, description="a rate | with a pipe")


def test_reference_of_a_small_model() -> None:
    md = config_reference_markdown(_Outer)
    assert "## Top level" in md and "## `inner`" in md and "the inner section" in md
    assert "| `rate` | float \\| null (> 0) | `null` | a rate \\| with a pipe |" in md
    assert "| `inner.k` | int (>= 1) | `3` | an inner knob |" in md
    assert "| `inner.mode` | `a` \\| `b` | `\"a\"` | **undocumented** |" in md


def _load_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference_hook", DOCS / "hooks" / "config_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Page:
    def __init__(self, src_uri: str) -> None:
        self.file = types.SimpleNamespace(src_uri=src_uri)


def test_docs_hook_generates_the_configuration_page(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _load_hook()
    page_md = (DOCS / "configuration.md").read_text()
    assert hook.MARKER in page_md
    out = hook.on_page_markdown(page_md, _Page("configuration.md"), None, None)
    assert hook.MARKER not in out and "| `round.num_rounds` |" in out
    # other pages pass through untouched
    assert hook.on_page_markdown(hook.MARKER, _Page("index.md"), None, None) == hook.MARKER
    with pytest.raises(ValueError, match="lost its"):
        hook.on_page_markdown("# no marker", _Page("configuration.md"), None, None)
    # an undocumented field fails the build, naming the field
    monkeypatch.setattr(config_module, "ExperimentConfig", _Outer)
    with pytest.raises(ValueError, match=r"inner\.mode"):
        hook.on_page_markdown(page_md, _Page("configuration.md"), None, None)


def test_config_reference_command() -> None:
    r = CliRunner().invoke(app, ["config-reference"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == config_reference_markdown().strip()


def _nav_files(nav: list[Any]) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_files(cfg["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, (
        f"pages missing from mkdocs.yml nav: {sorted(set(pages) - set(nav))}; "
        f"nav entries without a page: {sorted(set(nav) - set(pages))}"
    )
    assert cfg["theme"]["name"] == "material"
    assert "docs/hooks/config_reference.py" in cfg["hooks"]


def test_readme_is_short_and_its_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/results.md" in local and "docs/troubleshooting.md" in local
    broken = [t for t in local if not (REPO / t).exists()]
    assert not broken, f"README links to missing files: {broken}"


def test_docs_hook_generates_the_specifications_table_of_changed_defaults() -> None:
    """docs/specification.md lists exactly the algorithm.cafedistill defaults that differ from
    ``preset: spec``, compared here field by field, independently of the generator."""
    from cafe_ray.commands.reference import spec_changes
    from cafe_ray.config import CAFEDISTILL_SPEC_PRESET, CafeDistillConfig

    hook = _load_hook()
    page_md = (DOCS / "specification.md").read_text()
    out = hook.on_page_markdown(page_md, _Page("specification.md"), None, None)
    assert hook.SPEC_MARKER in page_md and hook.SPEC_MARKER not in out
    with pytest.raises(ValueError, match="lost its"):
        hook.on_page_markdown("# no marker", _Page("specification.md"), None, None)

    default = CafeDistillConfig()
    expected = []
    for key, spec_value in CAFEDISTILL_SPEC_PRESET.items():
        pairs = ([(f"{key}.{k}", v, getattr(default.selection, k)) for k, v in spec_value.items()]
                 if key == "selection" else [(key, spec_value, getattr(default, key))])
        expected += [(f"algorithm.cafedistill.{k}", s, d) for k, s, d in pairs if s != d]
    changes = spec_changes()
    assert sorted((c.path, c.spec, c.default) for c in changes) == sorted(expected)
    assert len(changes) >= 5
    for c in changes:
        assert f"| `{c.path}` |" in out


def test_the_product_names_no_path_outside_the_repository() -> None:
    """README, docs, configs, code and tests point into the repository (docs/specification.md),
    never at files a clone does not have."""
    roots = ["README.md", "docs", "simulations", "cafe_ray", "tests", "benchmarks", "policies"]
    files = [p for r in roots for p in ([REPO / r] if (REPO / r).is_file() else (REPO / r).rglob("*"))
             if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".yml", ".toml", ".txt")]
    assert len(files) > 100
    outside = re.compile("\\.\\./" + "shared|/work/" + "shared")  # split: this file must not match itself
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not hits, f"paths outside the repository: {hits}"
