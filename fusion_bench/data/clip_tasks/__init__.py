"""Class names and zero-shot prompt templates of the eight CLIP tasks (JSON files beside this one)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from fusion_bench.errors import UnknownNameError

__all__ = ["TASK_NAMES", "ALIASES", "canonical_task_name", "load_classnames_and_templates"]

TASK_NAMES = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
ALIASES = {"stanford-cars": "stanford_cars", "cars": "stanford_cars"}


def canonical_task_name(name: str) -> str:
    """The canonical name of a task (aliases such as ``stanford-cars`` resolved)."""
    return ALIASES.get(name, name)


@lru_cache(maxsize=None)
def _load(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = resources.files(__name__) / f"{task}.json"
    if task not in TASK_NAMES or not path.is_file():
        raise UnknownNameError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    data = json.loads(path.read_text())
    return tuple(data["classnames"]), tuple(data["templates"])


def load_classnames_and_templates(task: str) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` of ``task``; templates hold one ``{}`` for the class name."""
    classnames, templates = _load(canonical_task_name(task))
    return list(classnames), list(templates)
