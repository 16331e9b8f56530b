"""Collect JSON reports into result tables (Markdown, CSV, LaTeX) and figures: ``fusion_bench_report``."""

from fusion_bench.reporting.collect import Run, load_report, load_runs, lookup
from fusion_bench.reporting.render import to_csv, to_latex, to_markdown
from fusion_bench.reporting.tables import Row, Table, build_tables

__all__ = [
    "Run",
    "Row",
    "Table",
    "build_tables",
    "load_report",
    "load_runs",
    "lookup",
    "to_csv",
    "to_latex",
    "to_markdown",
]
