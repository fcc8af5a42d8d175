"""The shared table renderings of the inference reports."""

from __future__ import annotations

from rich.console import Console

from cafe_ray.inference.tables import markdown_rows, rich_rows


def test_markdown_rows_render_header_rule_and_rows() -> None:
    assert markdown_rows(("a", "b"), [["1", "2"], ["3", "4"]]) == [
        "| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_rich_rows_align_named_columns_left_and_numbers_right() -> None:
    t = rich_rows("title", ("policy", "accuracy"), [["threshold", "97.00%"]], left=("policy",))
    assert [c.justify for c in t.columns] == ["left", "right"] and t.row_count == 1
    console = Console(record=True, width=80)
    console.print(t)
    text = console.export_text()
    assert "│ threshold │   97.00% │" in text  # left-aligned name, right-aligned number
