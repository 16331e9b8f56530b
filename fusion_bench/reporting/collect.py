"""Read ``fusion_bench`` JSON reports into :class:`Run` records.

A report is a JSON object with at least one ``{task: {"accuracy": float, ...}}`` entry. Its
*sections* are the top-level tasks (section ``""``) and every top-level object that itself holds
such entries (e.g. ``"seen": {...}, "unseen": {...}`` of a generalization run); each section's
``average`` entry, when present, is its reported average. What the run was comes from its
``meta``: ``meta.config`` (the resolved config), ``meta.hydra.choices`` (the config names chosen),
``meta.fast_dev_run`` and ``meta.num_samples``. Reports written before ``meta.config`` existed
are named after their file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fusion_bench.errors import ConfigError

__all__ = ["Run", "find_report_files", "load_report", "load_runs", "lookup", "MISSING"]

MISSING = object()
_NOT_TASKS = {"average", "model_info", "meta"}


@dataclass
class Run:
    """One report.

    Attributes:
        path: the JSON file.
        method: the method's config name (``meta.hydra.choices.method``), else its class, else the file stem.
        params: the method's options (``meta.config.method`` less ``_target_``/``name``).
        model: for the evaluation of one model (``dummy`` on a pool holding only ``_pretrained_``):
            the model's name (last component of its path or hub id); else None.
        sections: ``{section: {task: {metric: value}}}``; ``""`` is the top level.
        averages: ``{section: {metric: value}}`` as reported.
        report: the whole JSON object.
    """

    path: Path
    method: str
    params: dict[str, Any]
    model: str | None
    sections: dict[str, dict[str, dict[str, float]]]
    averages: dict[str, dict[str, float]]
    report: dict[str, Any] = field(repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return self.report.get("meta") or {}

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config") or {}

    @property
    def fast_dev_run(self) -> bool:
        return bool(self.meta.get("fast_dev_run") or self.config.get("fast_dev_run"))

    def num_samples(self, task: str) -> int | None:
        """How many samples ``task``'s numbers come from (None: not reported)."""
        value = (self.meta.get("num_samples") or {}).get(task)
        return int(value) if isinstance(value, (int, float)) else None


def _is_metrics(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("accuracy"), (int, float))


def _tasks(obj: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {k: dict(v) for k, v in obj.items() if k not in _NOT_TASKS and _is_metrics(v)}


def _sections(report: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
    sections, averages = {"": _tasks(report)}, {}
    if _is_metrics(report.get("average")):
        averages[""] = dict(report["average"])
    for key, value in report.items():
        if key not in _NOT_TASKS and isinstance(value, Mapping) and not _is_metrics(value) and _tasks(value):
            sections[key] = _tasks(value)
            if _is_metrics(value.get("average")):
                averages[key] = dict(value["average"])
    return {k: v for k, v in sections.items() if v}, averages


def _method_name(report: Mapping[str, Any], path: Path) -> str:
    meta = report.get("meta") or {}
    choice = ((meta.get("hydra") or {}).get("choices") or {}).get("method")
    if choice:
        return str(choice)
    method = (meta.get("config") or {}).get("method") or {}
    target = method.get("_target_") or method.get("name")
    return str(target).rsplit(".", 1)[-1] if target else path.stem


def _single_model(method: Mapping[str, Any], modelpool: Mapping[str, Any]) -> str | None:
    """The evaluated model's name when the run evaluates one model alone."""
    target = str(method.get("_target_") or method.get("name") or "")
    models = modelpool.get("models")
    if (
        not (target.endswith("DummyAlgorithm") or target == "dummy")
        or not isinstance(models, Mapping)
        or len(models) != 1
    ):
        return None
    entry = next(iter(models.values()))
    path = entry.get("pretrained_model_name_or_path") if isinstance(entry, Mapping) else entry
    return Path(str(path).rstrip("/")).name if path else next(iter(models))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_report(path: str | Path) -> Run | None:
    """The :class:`Run` of one JSON file, or None if it is valid JSON but not a report (no task with
    an accuracy).

    Raises:
        ConfigError: the file cannot be read or is not valid JSON (NaN/Infinity included): a broken
            report is never skipped silently.
    """
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except OSError as err:
        raise ConfigError(f"cannot read {str(path)!r} ({err.__class__.__name__}: {err.strerror or err})") from None
    except ValueError as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(report, dict):
        return None
    sections, averages = _sections(report)
    if not sections:
        return None
    config = (report.get("meta") or {}).get("config") or {}
    method_cfg = config.get("method") or {}
    params = {k: v for k, v in method_cfg.items() if k not in ("_target_", "name")}
    model = _single_model(method_cfg, config.get("modelpool") or {})
    return Run(path, _method_name(report, path), params, model, sections, averages, report)


def find_report_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``*.json`` file named, or found (recursively) in a named folder, in a stable order.

    Raises:
        ConfigError: a path does not exist.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(
                q for q in p.rglob("*.json") if not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"no such file or folder: {str(p)!r}")
    return list(dict.fromkeys(files))


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The reports among ``paths`` (files or folders; valid JSON files that are not reports are
    skipped, invalid ones are an error).

    Raises:
        ConfigError: a path does not exist, a JSON file is invalid, or no report is found.
    """
    runs = [run for run in map(load_report, find_report_files(paths)) if run is not None]
    if not runs:
        raise ConfigError(
            f"no fusion_bench JSON report (an object with task accuracies) in {', '.join(map(str, paths))}"
        )
    return runs


def lookup(run: Run, dotted: str) -> Any:
    """A field of ``run``: ``meta.a.b``, ``config.a.b``, or ``a.b`` tried in meta, then config.

    Returns:
        the value, or :data:`MISSING`.
    """
    head, _, rest = dotted.partition(".")
    roots = {"meta": [run.meta], "config": [run.config]}.get(head)
    keys = rest.split(".") if roots is not None else dotted.split(".")
    for root in roots if roots is not None else [run.meta, run.config]:
        value: Any = root
        for key in keys:
            value = value.get(key, MISSING) if isinstance(value, Mapping) else MISSING
        if value is not MISSING:
            return value
    return MISSING
