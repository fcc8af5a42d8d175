"""`cafe-ray config-reference`: the configuration reference, generated from the config model.

The documentation site's configuration page (docs/configuration.md, through the MkDocs hook
docs/hooks/config_reference.py) and this command print the same Markdown, built from the
pydantic models in :mod:`cafe_ray.config`, so the reference can never drift from the code.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class FieldDoc:
    """One leaf of the config tree as the reference shows it."""

    path: str  # dotted key, e.g. "data.partition.alpha"; "<class>" stands for any dict key
    type: str
    default: str
    description: str | None


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (directly, optionally, or as dict values) and the path suffix."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if a is not type(None)]
        if len(models) == 1:
            return _nested_model(models[0])
    if origin is dict and len(args) == 2:
        inner, _ = _nested_model(args[1])
        if inner is not None:
            return inner, ".<class>"
    return None, ""


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if isinstance(a, str) else f"`{a!r}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def _constraints(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr)}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "-"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def iter_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of ``model``, recursively, as (dotted path, FieldInfo), sections included."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, info
        inner, suffix = _nested_model(info.annotation)
        if inner is not None:
            yield from iter_fields(inner, f"{path}{suffix}.")


def field_docs(model: type[BaseModel]) -> list[FieldDoc]:
    """The leaves of the config tree (sections are headings, not rows)."""
    docs = []
    for path, info in iter_fields(model):
        inner, suffix = _nested_model(info.annotation)
        if inner is not None and not suffix:
            continue  # a section: its fields are rows of its own table
        type_ = f"mapping of name to `{path}{suffix}`" if inner is not None else _type_name(info.annotation)
        bounds = _constraints(info)
        docs.append(FieldDoc(path, f"{type_} ({bounds})" if bounds else type_, _default(info),
                             info.description))
    return docs


def _sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel], str | None]]:
    for name, info in model.model_fields.items():
        inner, suffix = _nested_model(info.annotation)
        if inner is not None:
            path = f"{prefix}{name}{suffix}"
            yield path, inner, info.description
            yield from _sections(inner, f"{path}.")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(rows: list[FieldDoc]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in rows:
        meaning = _cell(f.description) if f.description else "**undocumented**"
        lines.append(f"| `{f.path}` | {f.type} | {f.default} | {meaning} |")
    return lines


def config_reference_markdown(model: type[BaseModel] | None = None, heading: str = "##") -> str:
    """The configuration reference as Markdown: one table per config section.

    Top-level scalar fields come first, then one heading per (nested) section with the
    section's own description and its direct fields.
    """
    if model is None:
        from cafe_ray.config import ExperimentConfig

        model = ExperimentConfig
    leaves = field_docs(model)

    def direct(section: str) -> list[FieldDoc]:
        depth = section.count(".") + 1 if section else 0
        return [f for f in leaves
                if f.path.startswith(f"{section}." if section else "")
                and f.path.count(".") == depth]

    out = [f"{heading} Top level", ""] + _table(direct("")) + [""]
    for path, _inner, description in _sections(model):
        rows = direct(path)
        if not rows:
            continue
        out += [f"{heading} `{path}`", ""]
        if description:
            out += [_cell(description), ""]
        out += _table(rows) + [""]
    return "\n".join(out)


@dataclass(frozen=True)
class SpecChange:
    """An ``algorithm.cafedistill`` field whose default is not the specification's value."""

    path: str
    spec: Any  # the value ``preset: spec`` gives
    default: Any
    description: str | None


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{name}").items()}
    return {prefix: value}


def spec_changes() -> list[SpecChange]:
    """Every ``algorithm.cafedistill`` default that differs from the specification, read from
    the config model itself (the defaults against ``preset: spec``), in field order."""
    from cafe_ray.config import CafeDistillConfig

    prefix = "algorithm.cafedistill"
    spec = _leaves(CafeDistillConfig(preset="spec").model_dump(mode="json"), prefix)
    default = _leaves(CafeDistillConfig().model_dump(mode="json"), prefix)
    info = dict(iter_fields(CafeDistillConfig, f"{prefix}."))
    return [SpecChange(path, spec[path], default[path], info[path].description)
            for path in default if path != f"{prefix}.preset" and spec[path] != default[path]]


def spec_changes_markdown() -> str:
    """:func:`spec_changes` as a Markdown table (docs/specification.md)."""
    lines = ["| key | specification (`preset: spec`) | default | meaning |", "|---|---|---|---|"]
    for c in spec_changes():
        meaning = _cell(c.description) if c.description else "**undocumented**"
        lines.append(f"| `{c.path}` | `{json.dumps(c.spec)}` | `{json.dumps(c.default)}` | {meaning} |")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("config-reference")
    def config_reference() -> None:
        """Print the configuration reference (every field, type, default, meaning) as Markdown."""
        typer.echo(config_reference_markdown())
