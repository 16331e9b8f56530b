"""Class names and zero-shot prompt templates of the CLIP image tasks (the eight of task arithmetic + the
twelve more of the 14/20-task benchmark).

Each task has a JSON file beside this module::

    {"task": ..., "source": ..., "classnames": [...], "templates": [...]}

``classnames`` follow the label order of the Hugging Face datasets the project evaluates on
(``tanganke/sun397``, ``tanganke/stanford_cars``, ``tanganke/resisc45``, ``tanganke/eurosat``,
``ufldl-stanford/svhn`` (``cropped_digits``), ``tanganke/gtsrb``, ``ylecun/mnist``,
``tanganke/dtd``); ``templates`` are the CLIP prompt sets as used by the task-vectors work,
each a format string with exactly one ``{}`` for the class name, e.g.
``"a photo of a {}.".format("abbey")``. The ``source`` field of each file says where its
lists come from.

The 14- and 20-task benchmark of the TALL-masks paper (Wang et al. 2024,
https://arxiv.org/abs/2405.07813) adds twelve tasks (:data:`TALL20_TASK_NAMES`), evaluated on
``dpdl-benchmark/oxford_flowers102``, ``1aurent/PatchCamelyon``, ``clip-benchmark/wds_fer2013``,
``timm/oxford-iiit-pet``, ``tanganke/stl10``, ``tanganke/cifar100``, ``tanganke/cifar10``,
``ethz/food101`` (``validation`` split), ``zalando-datasets/fashion_mnist``,
``tanganke/emnist_letters``, ``tanganke/kmnist`` and ``nateraw/rendered-sst2``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Mapping

from fusion_bench.errors import UnknownNameError

__all__ = [
    "TASK_NAMES",
    "TALL14_TASK_NAMES",
    "TALL20_TASK_NAMES",
    "ALIASES",
    "canonical_task_name",
    "load_classnames_and_templates",
]

TASK_NAMES: tuple[str, ...] = (
    "sun397",
    "stanford_cars",
    "resisc45",
    "eurosat",
    "svhn",
    "gtsrb",
    "mnist",
    "dtd",
)
"""The canonical task names, in the usual order of the eight-task benchmark."""

TALL14_TASK_NAMES: tuple[str, ...] = (
    *TASK_NAMES,
    "oxford_flowers102",
    "pcam",
    "fer2013",
    "oxford_iiit_pet",
    "stl10",
    "cifar100",
)
"""The 14-task benchmark: the eight + six, in the order of the TALL-masks paper."""

TALL20_TASK_NAMES: tuple[str, ...] = (
    *TALL14_TASK_NAMES,
    "cifar10",
    "food101",
    "fashion_mnist",
    "emnist_letters",
    "kmnist",
    "rendered_sst2",
)
"""The 20-task benchmark: the 14 + six more. Every name here has built-in class names and templates."""

ALIASES: Mapping[str, str] = {
    # Stanford Cars: the reference FusionBench name, the task-vectors name ("Cars").
    "stanford-cars": "stanford_cars",
    "stanfordcars": "stanford_cars",
    "cars": "stanford_cars",
    # SVHN: the TensorFlow Datasets name of the cropped-digits variant.
    "svhn_cropped": "svhn",
    # Hugging Face hub ids of the evaluation datasets.
    "tanganke/sun397": "sun397",
    "tanganke/stanford_cars": "stanford_cars",
    "tanganke/resisc45": "resisc45",
    "tanganke/eurosat": "eurosat",
    "ufldl-stanford/svhn": "svhn",
    "tanganke/gtsrb": "gtsrb",
    "ylecun/mnist": "mnist",
    "tanganke/dtd": "dtd",
    # The twelve tasks of the 14/20-task benchmark: the reference FusionBench names (hyphens) and the hub ids.
    "oxford-flowers102": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "oxford-iiit-pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "rendered-sst2": "rendered_sst2",
    "renderedsst2": "rendered_sst2",
    "fashion-mnist": "fashion_mnist",
    "emnist-letters": "emnist_letters",
    "dpdl-benchmark/oxford_flowers102": "oxford_flowers102",
    "clip-benchmark/wds_fer2013": "fer2013",
    "timm/oxford-iiit-pet": "oxford_iiit_pet",
    "tanganke/stl10": "stl10",
    "tanganke/cifar100": "cifar100",
    "tanganke/cifar10": "cifar10",
    "ethz/food101": "food101",
    "zalando-datasets/fashion_mnist": "fashion_mnist",
    "tanganke/emnist_letters": "emnist_letters",
    "tanganke/kmnist": "kmnist",
    "nateraw/rendered-sst2": "rendered_sst2",
}
"""Other accepted spellings (lower case) and the canonical task name each stands for.

Names are matched case-insensitively, so the task-vectors names (``SUN397``, ``Cars``,
``RESISC45``, ``EuroSAT``, ``SVHN``, ``GTSRB``, ``MNIST``, ``DTD``) resolve too.
"""


def canonical_task_name(name: str) -> str:
    """The canonical name of task ``name``.

    Canonical names and the keys of :data:`ALIASES` are matched case-insensitively and
    without surrounding whitespace. A name that is neither is returned unchanged (so a
    caller may still use it for a task with user-supplied class names);
    :func:`load_classnames_and_templates` raises for it.
    """
    key = name.strip().lower()
    if key in TALL20_TASK_NAMES:
        return key
    return ALIASES.get(key, name)


@lru_cache(maxsize=None)
def _load(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Read and check ``<task>.json`` (``task`` canonical); cached, hence immutable tuples."""
    text = (resources.files(__name__) / f"{task}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    classnames = tuple(data["classnames"])
    templates = tuple(data["templates"])
    if data.get("task") != task or not classnames or not templates:
        raise ValueError(f"{task}.json is malformed (task field {data.get('task')!r})")
    return classnames, templates


def load_classnames_and_templates(task: str) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` of ``task`` (a canonical name or an alias).

    ``classnames[i]`` is the name of label ``i`` of the task's evaluation dataset;
    every template holds exactly one ``{}`` for the class name. The lists are fresh
    copies; callers may modify them.

    Raises:
        UnknownNameError: (a :class:`KeyError`) ``task`` is not one of :data:`TALL20_TASK_NAMES`
            or an alias; the message quotes it and lists the known tasks.
    """
    canonical = canonical_task_name(task)
    if canonical not in TALL20_TASK_NAMES:
        raise UnknownNameError(
            f"unknown CLIP task {task!r}; known tasks: {', '.join(TALL20_TASK_NAMES)} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    classnames, templates = _load(canonical)
    return list(classnames), list(templates)
