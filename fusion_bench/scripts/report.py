"""The ``fusion_bench_report`` command: JSON reports -> result tables and figures.

    fusion_bench_report outputs/multirun/ta_sweep outputs/experts/*.json --out outputs/tables

Prints every table as Markdown; with ``--out DIR`` also writes ``DIR/tables.md``, one
``DIR/<table>.csv`` and ``DIR/<table>.tex`` per table, and ``DIR/figures/<table>.png``.
Errors (no report found, an unknown ``--group-by`` field) are one line with exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from fusion_bench.errors import FusionBenchError

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's options (see ``fusion_bench_report --help``)."""
    parser = argparse.ArgumentParser(
        prog="fusion_bench_report", description="Gather fusion_bench JSON reports into tables and figures."
    )
    parser.add_argument("paths", nargs="+", help="report files, or folders searched recursively for *.json")
    parser.add_argument(
        "--out", default=None, help="folder for tables.md, <table>.csv/.tex and figures/ (default: print only)"
    )
    parser.add_argument("--formats", default="md,csv,tex", help="comma-separated: md, csv, tex (default: all)")
    parser.add_argument(
        "--group-by",
        default=None,
        help="a meta/config field (e.g. corruption, meta.corruption, config.seed): one table per value",
    )
    parser.add_argument(
        "--sweep-param",
        default="scaling_factor",
        help="method option whose sweep is tabulated and plotted (default: scaling_factor)",
    )
    parser.add_argument("--metric", default="accuracy", help="the per-task metric (default: accuracy)")
    parser.add_argument("--scale", type=float, default=100.0, help="multiply values by this (default: 100, percent)")
    parser.add_argument("--digits", type=int, default=1, help="decimals in Markdown and LaTeX (default: 1)")
    parser.add_argument("--no-figures", action="store_true", help="write no figures")
    return parser.parse_args(argv)


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name)


def _write(args: argparse.Namespace, tables: list, document: str) -> None:
    from fusion_bench.errors import ConfigError
    from fusion_bench.reporting.figures import figures_for
    from fusion_bench.reporting.render import FORMATS, to_csv, to_latex
    from fusion_bench.utils.io import atomic_write

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    out = Path(args.out)
    outputs = {"md": lambda t: None, "csv": to_csv, "tex": lambda t: to_latex(t, digits=args.digits)}
    if "md" in formats:
        with atomic_write(out / "tables.md", "w", encoding="utf-8") as f:
            f.write(document)
    for table in tables:
        for fmt in formats:
            if fmt != "md":
                with atomic_write(out / f"{_file_stem(table.name)}.{fmt}", "w", encoding="utf-8") as f:
                    f.write(outputs[fmt](table))
    if not args.no_figures:
        for table in tables:
            table.name = _file_stem(table.name)
        figures_for(tables, out / "figures")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fusion_bench_report``."""
    args = parse_args(argv)
    from fusion_bench.reporting import build_tables, load_runs
    from fusion_bench.reporting.render import markdown_document

    try:
        runs = load_runs(args.paths)
        tables = build_tables(
            runs, group_by=args.group_by, sweep_param=args.sweep_param, metric=args.metric, scale=args.scale
        )
        document = markdown_document(tables, digits=args.digits, sources=[str(r.path) for r in runs])
        if args.out is not None:
            _write(args, tables, document)
    except FusionBenchError as err:
        print(f"fusion_bench_report: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nfusion_bench_report: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    print(document)


if __name__ == "__main__":
    main()
