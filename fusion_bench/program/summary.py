"""The short human summary printed at the end of a run (the JSON goes to the report file)."""

from __future__ import annotations

import sys
from typing import Any, Mapping, TextIO

__all__ = ["summary_lines", "print_report"]

_NOT_TASKS = ("average", "model_info", "meta")


def _is_metrics(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("accuracy"), (int, float))


def _rows(report: Mapping[str, Any]) -> list[tuple[str, float, Any]]:
    """``(label, accuracy, loss)`` of every task, then every section's tasks, then the averages."""
    rows = [(k, v["accuracy"], v.get("loss")) for k, v in report.items() if k not in _NOT_TASKS and _is_metrics(v)]
    for section, value in report.items():
        if section in _NOT_TASKS or not isinstance(value, Mapping) or _is_metrics(value):
            continue
        rows += [
            (f"{section}/{k}", v["accuracy"], v.get("loss"))
            for k, v in value.items()
            if k != "average" and _is_metrics(v)
        ]
        if _is_metrics(value.get("average")):
            rows.append((f"{section}/average", value["average"]["accuracy"], value["average"].get("loss")))
    if _is_metrics(report.get("average")):
        rows.append(("average", report["average"]["accuracy"], report["average"].get("loss")))
    return rows


def summary_lines(report: Mapping[str, Any], report_path: str | None) -> list[str]:
    """The summary: a per-task accuracy table with the average, the model size and the report path."""
    rows = _rows(report)
    lines = []
    if rows:
        width = max(len("task"), *(len(label) for label, _, _ in rows))
        lines.append(f"{'task':<{width}}  accuracy      loss")
        for label, accuracy, loss in rows:
            if label == "average":
                lines.append("-" * (width + 20))
            loss_text = f"{loss:10.4f}" if isinstance(loss, (int, float)) else f"{'':>10}"
            lines.append(f"{label:<{width}}  {100 * accuracy:7.2f}%{loss_text}")
    info = report.get("model_info") or {}
    seconds = (report.get("meta") or {}).get("wall_seconds")
    facts = []
    if isinstance(info.get("all_params"), int):
        facts.append(f"model: {info['all_params']:,} parameters")
    if isinstance(seconds, (int, float)):
        facts.append(f"{seconds:.1f} s")
    facts.append(f"report: {report_path}" if report_path else "report: not written (report_save_path=false)")
    lines.append("; ".join(facts))
    return lines


def print_report(report: Mapping[str, Any], report_path: str | None, *, file: TextIO | None = None) -> None:
    """Print :func:`summary_lines` to ``file`` (stdout by default)."""
    print("\n".join(summary_lines(report, report_path)), file=file or sys.stdout, flush=True)
