"""MkDocs hook: fill docs/configuration.md's marker with the reference generated from the config model.

The tables come from :func:`cafe_ray.commands.reference.config_reference_markdown`, the same
Markdown that ``cafe-ray config-reference`` prints, so the page can never drift from
``cafe_ray/config.py``. A page without the marker, or a field without a description, fails the
build instead of publishing an incomplete reference.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker on the configuration page; leave every other page alone."""
    if page.file.src_uri != PAGE:
        return markdown
    from cafe_ray.commands.reference import config_reference_markdown, field_docs
    from cafe_ray.config import ExperimentConfig

    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} line; put it back where the tables go")
    undocumented = [f.path for f in field_docs(ExperimentConfig) if not f.description]
    if undocumented:
        raise ValueError(
            "config fields without a description (add Field(..., description=...) in "
            f"cafe_ray/config.py): {', '.join(undocumented)}"
        )
    return markdown.replace(MARKER, config_reference_markdown(ExperimentConfig))
