"""A self-contained HTML report: tables, plots inlined as base64 PNG, no external references.

The writer (:mod:`fedlora.report.writer`) composes sections from the pieces here; :func:`page` wraps
them with the title and the facts about how the report was made.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1260px;
       color: #1b1b1b; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; white-space: normal; min-width: 7em; }
th { background: #f4f4f4; white-space: normal; vertical-align: bottom; }
.wide { overflow-x: auto; }
img { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.82em; overflow-x: auto; }
.legend, .about { color: #555; font-size: 0.88em; }
.about dt { font-weight: 600; float: left; clear: left; width: 7em; }
.about dd { margin-left: 7.5em; }
"""


def table(header: list[str], rows: list[list[str]], *, text_columns: tuple[int, ...] = ()) -> str:
    """A table with escaped cells (Markdown bold becomes <strong>); ``text_columns`` wrap, left-aligned."""
    head = "".join(
        f'<th class="text">{html.escape(h)}</th>' if i in text_columns else f"<th>{html.escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="text">{_cell(v)}</td>' if i in text_columns else f"<td>{_cell(v)}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def legend(text: str) -> str:
    return f'<p class="legend">{html.escape(text)}</p>'


def figure(path: Path) -> str:
    """An inlined PNG, its file name as alternative text."""
    return f'<img alt="{html.escape(path.stem.replace("_", " "))}" src="data:image/png;base64,{_b64(path)}">'


def preformatted(text: str, summary: str) -> str:
    """Text in a collapsible block, open by default."""
    return f"<details open><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>"


def page(title: str, sections: list[tuple[str, str]], about: dict[str, str]) -> str:
    """The report as one HTML string: a heading per (title, body HTML) section, then the facts."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections if content)
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in about.items())
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}: fedlora comparison</title><style>{STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="legend">fedlora comparison report</p>'
        f'{body}<h2>About this report</h2><dl class="about">{facts}</dl></body></html>\n'
    )


def _cell(text: str) -> str:
    """Escape a table cell, turning Markdown bold (the best value) into <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")
