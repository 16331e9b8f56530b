"""Class names and prompt templates of a task, wherever they come from.

One lookup shared by everything that builds zero-shot heads outside the task pool (fine-tuning,
test-time adaptation, data-based merges): explicit lists win, then the mini benchmark's tasks
(:mod:`fusion_bench.data.mini_tasks`), then the CLIP tasks (:mod:`fusion_bench.data.clip_tasks`).
"""

from __future__ import annotations

from typing import Sequence

from fusion_bench.data import mini_tasks
from fusion_bench.data.clip_tasks import canonical_task_name, load_classnames_and_templates
from fusion_bench.errors import ConfigError, UnknownNameError

__all__ = ["task_classnames_and_templates"]


def task_classnames_and_templates(
    task: str, classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None, *, what: str = "task"
) -> tuple[list[str], list[str]]:
    """The class names and prompt templates of ``task``: the given ones, else the built-in ones.

    Args:
        task: the task's name (one of the eight CLIP tasks, or a mini benchmark task).
        classnames: overriding class names (give ``templates`` with them).
        templates: overriding templates, each with one ``{}``.
        what: who asks, for messages (e.g. ``"clip_finetune"``).

    Returns:
        ``(classnames, templates)``.

    Raises:
        ConfigError: only one of the two is given, a template lacks ``{}``, or the task has no
            built-in lists.
    """
    if classnames is not None or templates is not None:
        if not classnames or not templates:
            raise ConfigError(f"{what}: task {task!r}: give both 'classnames' and 'templates', or neither")
        if any(str(t).count("{}") != 1 for t in templates):
            raise ConfigError(
                f"{what}: task {task!r}: every template needs exactly one '{{}}'; got {list(templates)!r}"
            )
        return [str(c) for c in classnames], [str(t) for t in templates]
    if task in mini_tasks.MINI_TASKS:
        text = mini_tasks.task_text(task)
        return text["classnames"], text["templates"]
    if task in mini_tasks.DOMAINS:  # the mini benchmark's second design
        domain = mini_tasks.DOMAINS[task]
        return list(domain.classnames), list(domain.templates)
    try:
        return load_classnames_and_templates(canonical_task_name(task))
    except UnknownNameError:
        raise ConfigError(
            f"{what}: no built-in class names for task {task!r} (known: the 20 CLIP tasks of fusion_bench.data.clip_tasks and the mini tasks "
            f"{', '.join(mini_tasks.MINI_TASKS)}); give 'classnames' and 'templates'"
        ) from None
