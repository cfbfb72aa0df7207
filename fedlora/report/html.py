"""A self-contained HTML report: the per-cell table and the plots inlined, no external references."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from fedlora.report.results import CellStats, legend, table

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1040px;
       color: #1b1b1b; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
.legend, .about { color: #555; font-size: 0.88em; }
.about dt { font-weight: 600; float: left; clear: left; width: 7em; }
.about dd { margin-left: 7.5em; }
"""


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """A table with escaped cells (Markdown bold becomes <strong>)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(
    title: str,
    cells: list[CellStats],
    target: float,
    images: list[Path],
    about: dict[str, str],
    paired: tuple[str, list[str], list[list[str]], str] | None = None,
) -> str:
    """The report page as one HTML string (images embedded as base64 PNG data).

    ``paired``: the paired-difference table (heading, header, rows, legend), shown first.
    """
    header, rows = table(cells, target)
    first = ""
    if paired is not None:
        heading, p_header, p_rows, p_legend = paired
        first = (
            f"<h2>{html.escape(heading)}</h2>{html_table(p_header, p_rows)}"
            f'<p class="legend">{html.escape(p_legend)}</p><h2>Per cell</h2>'
        )
    figures = "".join(
        f'<img alt="{html.escape(p.stem.replace("_", " "))}" src="data:image/png;base64,{_b64(p)}">'
        for p in images
    )
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in about.items())
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}: fedlora comparison</title><style>{STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="legend">fedlora comparison report</p>'
        f"{first}{html_table(header, rows)}"
        f'<p class="legend">{html.escape(legend(cells, target))}</p>'
        f'{figures}<dl class="about">{facts}</dl></body></html>\n'
    )


def _cell(text: str) -> str:
    """Escape a table cell, turning Markdown bold (the best value) into <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")
