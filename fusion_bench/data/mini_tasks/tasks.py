"""The eight tasks of the built-in offline benchmark, and their datasets.

Each task labels one attribute of the generated scenes (:mod:`.scenes`); its images show
the other attributes at random, so what one expert must attend to is clutter for the next:

=============  =======  ==============================================  =====================
task           classes  question                                        images
=============  =======  ==============================================  =====================
shape          8        which shape?                                    a shape
color          8        which colour is the object?                     shape, digit or dots
texture        8        which pattern is the background?                shape, digit or dots
background     8        which colour is the background?                 shape, digit or dots
size           3        how big is the shape?                           a shape
quality        4        sharp, blurry, noisy or pixelated?              shape, digit or dots
digit          10       which handwritten digit (scikit-learn digits)?  a digit
count          6        how many dots?                                  dots
=============  =======  ==============================================  =====================

Datasets are ``datasets.DatasetDict`` s with ``train``/``test`` splits, an ``image``
(``datasets.Image``) and a ``label`` (``ClassLabel`` over the class names) column, built
deterministically from a seed (labels balanced, test digits from held-out writers).
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fusion_bench.data.mini_tasks import scenes
from fusion_bench.errors import DatasetError, UnknownNameError
from fusion_bench.utils.io import atomic_directory

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DATASET_FORMAT",
    "MINI_TASKS",
    "MiniTask",
    "build_mini_task_datasets",
    "build_task_dataset",
    "get_mini_task",
    "task_text",
]

DATASET_FORMAT = 1
MARKER = ".complete"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class MiniTask:
    """One task: which scene attribute is the label, its classes and prompt templates.

    Attributes:
        name: the task name (the model pool / task pool key).
        attribute: the :class:`~.scenes.Scene` field holding the label's value.
        values: that field's value for each label, in label order.
        classnames: the class names prompts are filled with, in label order.
        templates: zero-shot prompt templates (each with one ``{}``).
        kinds: the scene kinds the task's images are drawn from.
    """

    name: str
    attribute: str
    values: tuple[Any, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    kinds: tuple[scenes.Kind, ...]


def _task(
    name: str, attribute: str, values: tuple, templates: tuple[str, ...], kinds: tuple, names: tuple = ()
) -> MiniTask:
    return MiniTask(name, attribute, tuple(values), tuple(names or values), tuple(templates), tuple(kinds))


_COUNT_NAMES = ("one dot", "two dots", "three dots", "four dots", "five dots", "six dots")
MINI_TASKS: dict[str, MiniTask] = {
    t.name: t
    for t in (
        _task("shape", "shape", scenes.SHAPES, ("a photo of a {}.", "a {} shape.", "a drawing of a {}."), ("shape",)),
        _task(
            "color",
            "color",
            tuple(scenes.COLORS),
            ("a photo of something {}.", "a {} object.", "the color {}."),
            scenes.KINDS,
        ),
        _task("texture", "texture", scenes.TEXTURES, ("a photo of a {} background.", "a {} texture."), scenes.KINDS),
        _task(
            "background",
            "background",
            tuple(scenes.BACKGROUNDS),
            ("a photo on a {} background.", "something against a {} backdrop."),
            scenes.KINDS,
        ),
        _task("size", "size", scenes.SIZES, ("a photo of a {} object.", "a {} thing."), ("shape",)),
        _task("quality", "quality", scenes.QUALITIES, ("a {} photo.", "a {} image of something."), scenes.KINDS),
        _task(
            "digit", "digit", scenes.DIGITS, ('a photo of the number: "{}".', "a photo of the digit {}."), ("digit",)
        ),
        _task("count", "count", scenes.COUNTS, ("a photo of {}.", "an image with {}."), ("dots",), _COUNT_NAMES),
    )
}
"""The eight tasks, in benchmark order."""


def get_mini_task(name: str) -> MiniTask:
    """The task called ``name``.

    Raises:
        UnknownNameError: listing the known tasks.
    """
    if name not in MINI_TASKS:
        raise UnknownNameError(f"unknown mini task {name!r}. Known: {', '.join(MINI_TASKS)}")
    return MINI_TASKS[name]


def _sample_images(task: MiniTask, split: str, n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """``n`` rendered images of ``task`` with balanced labels.

    Args:
        task: the task.
        split: ``"train"`` or ``"test"`` (also picks the digit writers' pool).
        n: number of images.
        seed: the task's seed (the split and the task's position are mixed in).

    Returns:
        the (32, 32, 3) uint8 images and their labels.
    """
    rng = np.random.default_rng([seed, list(MINI_TASKS).index(task.name), SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % len(task.values)).tolist()
    images = []
    for label in labels:
        kind = task.kinds[int(rng.integers(len(task.kinds)))]
        scene = scenes.sample_scene(rng, kind, split, **{task.attribute: task.values[label]})
        images.append(scenes.render_scene(rng, scene, split))
    return images, labels


def build_task_dataset(name: str, *, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> datasets.DatasetDict:
    """The ``train``/``test`` ``DatasetDict`` of task ``name``, built in memory.

    Args:
        name: the task (a key of :data:`MINI_TASKS`).
        n_train: training images.
        n_test: test images.
        seed: base seed of every task's data.

    Returns:
        the dataset (``image``: ``datasets.Image``, ``label``: ``ClassLabel``).
    """
    import datasets
    from PIL import Image

    task = get_mini_task(name)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.classnames))})
    splits = {}
    for split, n in zip(SPLITS, (n_train, n_test)):
        images, labels = _sample_images(task, split, n, seed)
        pil = [Image.fromarray(img, "RGB") for img in images]
        splits[split] = datasets.Dataset.from_dict({"image": pil, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_mini_task_datasets(root: str | Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> Path:
    """Build (once) every task's dataset under ``root/<task>`` with ``save_to_disk``.

    A complete build with the same parameters (marker ``root/.complete``) is reused;
    otherwise everything is built into a temporary sibling folder that replaces ``root``
    at the end, so a crash never leaves a half-built cache.

    Args:
        root: the cache folder.
        n_train: training images per task.
        n_test: test images per task.
        seed: base seed.

    Returns:
        ``root`` as an absolute ``Path``.

    Raises:
        DatasetError: ``root`` is a non-empty folder that holds no complete build.
    """
    marker = {"format": DATASET_FORMAT, "seed": seed, "n_train": n_train, "n_test": n_test, "tasks": list(MINI_TASKS)}
    build = functools.partial(build_task_dataset, n_train=n_train, n_test=n_test, seed=seed)
    return build_datasets_once(root, marker, MINI_TASKS, build)


def build_datasets_once(root: str | Path, marker: dict, names: Sequence[str], build: Callable[[str], Any]) -> Path:
    """``build(name).save_to_disk(root/<name>)`` for every name, unless ``root`` already holds a complete build
    with this ``marker`` (``root/.complete``); built into a temporary sibling that replaces ``root`` at the end.

    Raises:
        DatasetError: ``root`` is a non-empty folder that holds no complete build.
    """
    root = Path(root).expanduser().absolute()
    if _read_marker(root) == marker:
        return root
    if root.is_dir() and any(root.iterdir()) and _read_marker(root) is None:
        raise DatasetError(f"{str(root)!r} is not empty and holds no mini benchmark datasets; not replacing it")
    with atomic_directory(root) as tmp, _no_progress_bars():
        for name in names:
            build(name).save_to_disk(str(tmp / name))
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    return root


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide ``datasets``' progress bars inside the block (restored after)."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def task_text(name: str) -> Mapping[str, list[str]]:
    """``{"classnames": [...], "templates": [...]}`` of task ``name`` (as the configs give them)."""
    task = get_mini_task(name)
    return {"classnames": list(task.classnames), "templates": list(task.templates)}
