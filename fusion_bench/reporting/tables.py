"""The published result tables' layouts (docs/algorithms.md) from :class:`~fusion_bench.reporting.collect.Run` records.

* ``methods`` (one per report section: ``methods``, ``methods_seen``, ...): method × task, with
  the average; one row per merge run, labelled by the method and the options that tell its runs apart;
* ``cross_task``: each single model (``method=dummy`` on an ``_individual`` pool) on every task,
  rows ordered so that an expert named ``..._<task>`` sits on its task's column;
* ``by_<field>``: with ``group_by``, a methods table per value of a meta/config field (e.g.
  ``corruption``) and a method × value summary of the average;
* ``sweep_<param>``: runs that set the method option ``param`` (default ``scaling_factor``):
  average accuracy per value, one row per method.

Values are ``metric × scale`` (percent by default). Rows from ``fast_dev_run`` reports are
flagged ``†``; rows that miss a task of the table, or used fewer test samples for a task than
another report did, are flagged ``‡`` (partial).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fusion_bench.errors import ConfigError
from fusion_bench.reporting.collect import MISSING, Run, lookup

__all__ = [
    "Row",
    "Table",
    "FLAG_NOTES",
    "build_tables",
    "methods_table",
    "cross_task_table",
    "sweep_table",
    "row_labels",
]

FAST, PARTIAL = "†", "‡"
FLAG_NOTES = {
    FAST: "fast_dev_run: only the first batches of each test set",
    PARTIAL: "partial: a task is missing, or fewer test samples than in another report",
}


@dataclass
class Row:
    label: str
    values: list[float | None]
    flags: str = ""


@dataclass
class Table:
    """A titled grid; ``x`` holds the numeric column values of a sweep table."""

    name: str
    title: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    x: list[float] | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _tell_apart(runs: Sequence[Run], exclude: Sequence[str] = ()) -> list[str]:
    """Labels: the method, plus the method options (then seed, pools) that differ within its runs."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    differing = {method: _differing_fields(same, exclude) for method, same in groups.items()}
    labels = []
    for run in runs:
        parts = [f"{name.rsplit('.', 1)[-1]}={_short(get(run))}" for name, get in differing[run.method]]
        labels.append(f"{run.method} ({', '.join(parts)})" if parts else run.method)
    return labels


def _differing_fields(same: Sequence[Run], exclude: Sequence[str]) -> list[tuple[str, Callable[[Run], Any]]]:
    """The (name, getter) pairs of the method options, seed and pools whose values differ among ``same``."""
    keys = sorted({k for r in same for k in r.params} - set(exclude))
    extras = [(f"{k}", lambda r, k=k: r.params.get(k, MISSING)) for k in keys]
    extras += [
        (k, lambda r, k=k: lookup(r, k))
        for k in ("seed", "meta.hydra.choices.modelpool", "meta.hydra.choices.taskpool")
    ]
    return [
        (name, get)
        for name, get in extras
        if len({_dumps(get(r) if get(r) is not MISSING else None) for r in same}) > 1
    ]


def _short(value: Any) -> str:
    """A label part's value: ``unset`` where the report does not record it (e.g. no meta.hydra.choices)."""
    if value is MISSING:
        return "unset"
    return str(value) if not isinstance(value, (dict, list)) else _dumps(value)


def row_labels(runs: Sequence[Run], exclude: Sequence[str] = ()) -> list[str]:
    """One label per run, unique: where options do not tell runs apart, each file's path relative
    to the duplicates' common folder is added."""
    labels = _tell_apart(runs, exclude)
    for label in {lab for lab in labels if labels.count(lab) > 1}:
        dups = [i for i, lab in enumerate(labels) if lab == label]
        root = os.path.commonpath([str(runs[i].path.parent) for i in dups])
        for i in dups:
            labels[i] = f"{label} [{os.path.relpath(runs[i].path, root)}]"
    return labels


def _columns(runs: Sequence[Run], section: str) -> list[str]:
    return list(dict.fromkeys(t for r in runs for t in r.sections.get(section, {})))


def _max_samples(runs: Sequence[Run]) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in runs:
        for task in run.sections.get("", {}):
            n = run.num_samples(task)
            if n is not None:
                out[task] = max(out.get(task, 0), n)
    return out


def _flags(run: Run, tasks: Sequence[str], section: str, max_samples: dict[str, int]) -> str:
    have = run.sections.get(section, {})
    short = any((run.num_samples(t) or max_samples.get(t, 0)) < max_samples.get(t, 0) for t in have)
    return (FAST if run.fast_dev_run else "") + (PARTIAL if short or any(t not in have for t in tasks) else "")


def _row(run: Run, label: str, tasks: Sequence[str], section: str, metric: str, scale: float, max_samples: dict) -> Row:
    have = run.sections.get(section, {})
    values = [have[t][metric] * scale if t in have and metric in have[t] else None for t in tasks]
    reported = run.averages.get(section, {}).get(metric)
    present = [v for v in values if v is not None]
    average = reported * scale if reported is not None else (sum(present) / len(present) if present else None)
    return Row(label, [*values, average], _flags(run, tasks, section, max_samples))


def _notes(rows: Sequence[Row]) -> list[str]:
    return [f"{flag} {note}" for flag, note in FLAG_NOTES.items() if any(flag in r.flags for r in rows)]


def methods_table(
    runs: Sequence[Run],
    *,
    section: str = "",
    metric: str = "accuracy",
    scale: float = 100.0,
    name: str = "methods",
    title: str | None = None,
    all_runs: Sequence[Run] | None = None,
) -> Table:
    """Method × task (+ average) over the runs that have ``section``."""
    runs = [r for r in runs if section in r.sections]
    tasks, max_samples = _columns(runs, section), _max_samples(all_runs or runs)
    rows = [_row(r, label, tasks, section, metric, scale, max_samples) for r, label in zip(runs, row_labels(runs))]
    title = title or f"{metric} (%) of each method" + (f", {section} tasks" if section else "")
    return Table(name, title, [*tasks, "avg"], rows, _notes(rows))


def _own_task_order(model: str, tasks: Sequence[str]) -> int:
    """1 + the column of the task ``model`` is named after (``clip_stanford-cars`` -> ``stanford_cars``); 0 if none."""
    name = model.replace("-", "_")
    for i, task in enumerate(tasks):
        if name.endswith("_" + task.replace("-", "_")):
            return i + 1
    return 0  # the pre-trained model (no task suffix) first


def cross_task_table(
    runs: Sequence[Run], *, metric: str = "accuracy", scale: float = 100.0, all_runs: Sequence[Run] | None = None
) -> Table:
    """Every single-model run (expert or pre-trained) × task; the diagonal is each expert's own task."""
    tasks, max_samples = _columns(runs, ""), _max_samples(all_runs or runs)
    ordered = sorted(runs, key=lambda r: (_own_task_order(r.model or "", tasks), r.model or ""))
    labels = [r.model or r.method for r in ordered]
    labels = [f"{lab} [{r.path.name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, ordered)]
    rows = [_row(r, label, tasks, "", metric, scale, max_samples) for r, label in zip(ordered, labels)]
    return Table("cross_task", f"{metric} (%) of each model on each task", [*tasks, "avg"], rows, _notes(rows))


def sweep_table(runs: Sequence[Run], param: str, *, metric: str = "accuracy", scale: float = 100.0) -> Table | None:
    """Average ``metric`` per value of the method option ``param``; None if fewer than 2 values."""
    swept = [
        r for r in runs if isinstance(r.params.get(param), (int, float)) and not isinstance(r.params.get(param), bool)
    ]
    values = sorted({float(r.params[param]) for r in swept})
    if len(values) < 2:
        return None
    labels = _tell_apart(swept, exclude=[param])
    rows: dict[str, Row] = {}
    for run, label in zip(swept, labels):
        row = rows.setdefault(label, Row(label, [None] * len(values)))
        average = run.averages.get("", {}).get(metric)
        row.values[values.index(float(run.params[param]))] = average * scale if average is not None else None
        row.flags = "".join(sorted(set(row.flags) | set(FAST if run.fast_dev_run else "")))
    table_rows = list(rows.values())
    title = f"average {metric} (%) against {param}"
    return Table(f"sweep_{param}", title, [f"{v:g}" for v in values], table_rows, _notes(table_rows), x=values)


def _group_tables(runs: Sequence[Run], group_by: str, metric: str, scale: float) -> list[Table]:
    values = [lookup(r, group_by) for r in runs]
    if all(v is MISSING for v in values):
        raise ConfigError(f"group_by {group_by!r}: no report has this meta/config field")
    groups = list(dict.fromkeys(_short(v) for v in values if v is not MISSING))
    tables, summary = [], {}
    for group in groups:
        members = [r for r, v in zip(runs, values) if v is not MISSING and _short(v) == group]
        table = methods_table(
            members,
            metric=metric,
            scale=scale,
            name=f"by_{group_by}_{group}",
            title=f"{metric} (%) with {group_by} = {group}",
            all_runs=runs,
        )
        tables.append(table)
        for row in table.rows:
            summary.setdefault(row.label, {})[group] = (row.values[-1], row.flags)
    rows = [
        Row(
            label,
            [cells.get(g, (None, ""))[0] for g in groups],
            "".join(sorted({f for _, fl in cells.values() for f in fl})),
        )
        for label, cells in summary.items()
    ]
    tables.insert(0, Table(f"by_{group_by}", f"average {metric} (%) per {group_by}", groups, rows, _notes(rows)))
    return tables


def _in_reading_order(runs: Sequence[Run]) -> list[Run]:
    """Runs grouped by method (in order of first appearance), each method's runs by their options' values."""
    first = {m: i for i, m in reversed(list(enumerate(r.method for r in runs)))}

    def key(run: Run) -> tuple:
        values = [
            (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, _dumps(v))
            for _, v in sorted(run.params.items())
        ]
        return first[run.method], values

    return sorted(runs, key=key)


def build_tables(
    runs: Sequence[Run],
    *,
    group_by: str | None = None,
    sweep_param: str | None = "scaling_factor",
    metric: str = "accuracy",
    scale: float = 100.0,
) -> list[Table]:
    """All the tables the runs support (see the module docstring), in reading order."""
    merges, singles = _in_reading_order([r for r in runs if r.model is None]), [r for r in runs if r.model is not None]
    tables: list[Table] = []
    if group_by:
        tables += _group_tables(merges or runs, group_by, metric, scale)
    elif merges:
        sections = list(dict.fromkeys(s for r in merges for s in r.sections))
        tables += [
            methods_table(
                merges, section=s, metric=metric, scale=scale, name="methods" + (f"_{s}" if s else ""), all_runs=runs
            )
            for s in sections
        ]
    if singles:
        tables.append(cross_task_table(singles, metric=metric, scale=scale, all_runs=runs))
    sweep = sweep_table(merges, sweep_param, metric=metric, scale=scale) if sweep_param else None
    return tables + ([sweep] if sweep is not None else [])
