"""Named groups of tasks with their own averages in the report (e.g. seen vs unseen tasks).

A task pool option ``task_groups: {seen: [sun397, ...], unseen: [mnist, eurosat]}`` adds, next
to the per-task entries and the overall ``average``, one entry per group with the unweighted
mean of each metric over the group's tasks: ``"seen": {"accuracy": ..., "loss": ...}``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fusion_bench.errors import ConfigError
from fusion_bench.utils.instantiate import to_container

__all__ = ["RESERVED_REPORT_KEYS", "check_task_groups", "mean_over_tasks", "add_group_averages"]

RESERVED_REPORT_KEYS = ("average", "model_info", "meta")


def check_task_groups(groups: Any, task_names: Sequence[str], *, what: str = "taskpool") -> dict[str, list[str]]:
    """Validate ``task_groups`` against the pool's tasks.

    Args:
        groups: ``{group: [task, ...]}`` or None.
        task_names: the pool's tasks.
        what: the pool's name for messages.

    Returns:
        ``{group: [task, ...]}`` (empty if ``groups`` is None).

    Raises:
        ConfigError: not a mapping of non-empty task lists, an unknown or repeated task, or a
            group named like a task or a reserved report key.
    """
    groups = to_container(groups)
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise ConfigError(f"{what}: 'task_groups' must map group names to task lists, got {groups!r}")
    checked: dict[str, list[str]] = {}
    for name, tasks in groups.items():
        name = str(name)
        if name in task_names or name in RESERVED_REPORT_KEYS:
            raise ConfigError(f"{what}: task group {name!r} clashes with a task or report key; rename it")
        if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
            raise ConfigError(f"{what}: task group {name!r} must be a non-empty list of tasks, got {tasks!r}")
        unknown = [t for t in tasks if t not in task_names]
        if unknown:
            raise ConfigError(
                f"{what}: task group {name!r} names unknown task(s) {unknown}; tasks: {', '.join(task_names)}"
            )
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"{what}: task group {name!r} lists a task twice: {list(tasks)}")
        checked[name] = [str(t) for t in tasks]
    return checked


def mean_over_tasks(report: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> dict[str, float]:
    """The unweighted mean of every metric the ``tasks``' entries share.

    Args:
        report: ``{task: {metric: value}}``.
        tasks: the tasks to average over (non-empty).

    Returns:
        ``{metric: mean}``, metrics in the first task's order.
    """
    metrics = [m for m in report[tasks[0]] if all(m in report[t] for t in tasks)]
    return {m: sum(float(report[t][m]) for t in tasks) / len(tasks) for m in metrics}


def add_group_averages(report: dict[str, Any], groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Add ``report[group] = mean_over_tasks(report, tasks)`` for each group (in place; returned)."""
    for name, tasks in groups.items():
        report[name] = mean_over_tasks(report, tasks)
    return report
