"""Tables as Markdown, CSV and LaTeX (booktabs)."""

from __future__ import annotations

import csv
import io
import re
from typing import Sequence

from fusion_bench.reporting.tables import Table

__all__ = ["to_markdown", "to_csv", "to_latex", "markdown_document", "FORMATS"]

FORMATS = ("md", "csv", "tex")
_LATEX_SPECIAL = re.compile(r"([&%$#_{}])")
_LATEX_FLAGS = {"†": r"\textsuperscript{\dag}", "‡": r"\textsuperscript{\ddag}"}


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def to_markdown(table: Table, *, digits: int = 1) -> str:
    """A titled GitHub-flavoured Markdown table, notes below."""
    lines = [
        f"### {table.title}",
        "",
        "| | " + " | ".join(table.columns) + " |",
        "|---|" + "---:|" * len(table.columns),
    ]
    for row in table.rows:
        label = row.label.replace("|", "\\|") + (f" {row.flags}" if row.flags else "")
        lines.append(f"| {label} | " + " | ".join(_cell(v, digits) for v in row.values) + " |")
    return "\n".join([*lines, *([""] + table.notes if table.notes else [])]) + "\n"


def to_csv(table: Table) -> str:
    """One header row (``label``, columns, ``flags``), then one row per table row; empty cells for missing values."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", *table.columns, "flags"])
    for row in table.rows:
        writer.writerow([row.label, *("" if v is None else round(v, 6) for v in row.values), row.flags])
    return out.getvalue()


def _latex(text: str) -> str:
    text = _LATEX_SPECIAL.sub(r"\\\1", text)
    for flag, tex in _LATEX_FLAGS.items():
        text = text.replace(flag, tex)
    return text


def to_latex(table: Table, *, digits: int = 1) -> str:
    """A ``tabular`` with booktabs rules (``\\usepackage{booktabs}``), the notes as footer rows."""
    spec = "l" + "r" * len(table.columns)
    lines = [
        f"% {table.title}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(["Method", *map(_latex, table.columns)]) + " \\\\",
        "\\midrule",
    ]
    for row in table.rows:
        cells = [_latex(row.label + row.flags), *("--" if v is None else f"{v:.{digits}f}" for v in row.values)]
        lines.append(" & ".join(cells) + " \\\\")
    lines.append("\\bottomrule")
    for note in table.notes:
        lines.append(f"\\multicolumn{{{len(table.columns) + 1}}}{{l}}{{\\footnotesize {_latex(note)}}} \\\\")
    return "\n".join([*lines, "\\end{tabular}"]) + "\n"


def markdown_document(tables: Sequence[Table], *, digits: int = 1, sources: Sequence[str] = ()) -> str:
    """Every table in one Markdown document (with the list of report files, if given)."""
    parts = [to_markdown(t, digits=digits) for t in tables]
    if sources:
        parts.append(f"Collected from {len(sources)} report(s).\n")
    return "\n".join(parts)
