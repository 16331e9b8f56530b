"""The Results view's data: reports read with the collector and tables of ``fusion_bench_report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["results_payload", "safe_file"]

PROVENANCE_KEYS = (
    "fusion_bench_version",
    "torch_version",
    "transformers_version",
    "seed",
    "fast_dev_run",
    "device",
    "packages",
)


def _run_entry(run: Any, label: str, roots: Sequence[Path]) -> dict[str, Any]:
    """One report for the page; ``roots`` are the resolved results folders."""
    meta, config = run.meta, run.config
    return {
        "label": label,
        "method": run.method,
        "path": str(run.path),
        "file": _relative_link(run.path, roots),
        "params": run.params,
        "sections": run.sections,
        "averages": run.averages,
        "provenance": {k: meta[k] for k in PROVENANCE_KEYS if k in meta},
        "choices": ((meta.get("hydra") or {}).get("choices")) or {},
        "config": config,
    }


def _relative_link(path: Path, roots: Sequence[Path]) -> str | None:
    """``<root index>/<path under that root>`` for the file route, or None; ``roots`` already resolved."""
    resolved = path.resolve()
    for i, root in enumerate(roots):
        try:
            return f"{i}/{resolved.relative_to(root).as_posix()}"
        except ValueError:
            continue
    return None


def _table_entry(table: Any, digits: int) -> dict[str, Any]:
    from fusion_bench.reporting.render import to_csv, to_latex, to_markdown

    return {
        "name": table.name,
        "title": table.title,
        "columns": table.columns,
        "notes": table.notes,
        "x": table.x,
        "rows": [{"label": r.label, "values": r.values, "flags": r.flags} for r in table.rows],
        "exports": {
            "md": to_markdown(table, digits=digits),
            "csv": to_csv(table),
            "tex": to_latex(table, digits=digits),
        },
    }


def results_payload(roots: Sequence[Path], *, sweep_param: str = "scaling_factor", digits: int = 1) -> dict[str, Any]:
    """Every report under ``roots`` (folders that exist), with the tables ``fusion_bench_report``
    builds from them, its Markdown document, and the specs of the charts of those tables
    (:func:`~fusion_bench.webui.charts.chart_specs`); ``error`` holds the collector's one-line error."""
    from fusion_bench.errors import FusionBenchError
    from fusion_bench.reporting import build_tables, load_runs
    from fusion_bench.reporting.render import markdown_document
    from fusion_bench.reporting.tables import row_labels
    from fusion_bench.webui.charts import chart_specs

    existing = [r for r in roots if r.exists()]
    payload: dict[str, Any] = {
        "roots": [str(r) for r in roots],
        "runs": [],
        "tables": [],
        "markdown": "",
        "charts": [],
        "error": None,
    }
    if not existing:
        payload["error"] = "no results folder yet"
        return payload
    try:
        runs = load_runs(existing)
        tables = build_tables(runs, sweep_param=sweep_param)
    except FusionBenchError as err:
        payload["error"] = str(err)
        return payload
    resolved = [r.resolve() for r in roots]
    payload["runs"] = [_run_entry(r, label, resolved) for r, label in zip(runs, row_labels(runs))]
    payload["tables"] = [_table_entry(t, digits) for t in tables]
    payload["charts"] = chart_specs(tables)
    payload["markdown"] = markdown_document(tables, digits=digits, sources=[str(r.path) for r in runs])
    return payload


def safe_file(roots: Sequence[Path], link: str) -> Path | None:
    """The file ``<root index>/<relative path>`` names, or None: unknown root, an absolute path,
    a ``..`` part, or anything that resolves outside its root (symlinks included)."""
    index, _, rest = link.partition("/")
    if not index.isdigit() or int(index) >= len(roots) or not rest:
        return None
    parts = rest.replace("\\", "/").split("/")
    if rest.startswith("/") or any(p in ("..", "") for p in parts) or ":" in parts[0]:
        return None
    root = roots[int(index)].resolve()
    path = (root / Path(*parts)).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path
