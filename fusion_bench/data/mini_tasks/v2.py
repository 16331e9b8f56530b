"""Datasets and pre-training batches of the benchmark's second design (:mod:`.domains`).

* :func:`build_task_dataset_v2` builds one task's ``train``/``test`` ``DatasetDict`` (balanced
  labels, seeded), like :func:`.tasks.build_task_dataset` does for the first design;
* :func:`pretraining_pool` renders the images contrastive pre-training draws from: its own
  seed stream (never the tasks' train or test images; handwritten digits from the training
  writers only), the same number of images per domain;
* :func:`caption_v2` describes an image: its domain always, its class with probability
  :data:`CLASS_MENTION` (the rest of the captions say only what kind of image it is), in one of
  several phrasings per domain.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusion_bench.data.mini_tasks.domains import DOMAINS, render
from fusion_bench.data.mini_tasks.tasks import build_datasets_once

if TYPE_CHECKING:
    import datasets

__all__ = [
    "CLASS_MENTION",
    "POOL_CONTRAST_DOMAINS",
    "POOL_TINT_DOMAINS",
    "TASKS_V2",
    "build_mini_task_datasets_v2",
    "build_task_dataset_v2",
    "caption_v2",
    "pool_appearance",
    "pool_contrast",
    "pool_tint",
    "pretraining_pool",
    "tokenizer_corpus_v2",
]

TASKS_V2 = tuple(DOMAINS)
"""The eight tasks of the second design, in benchmark order."""
CLASS_MENTION = 0.5
"""Chance that a pre-training caption names the image's class (otherwise only its domain)."""
SPLITS = ("train", "test")
_PRETRAIN_STREAM = 7  # keeps the pre-training images' seeds apart from the tasks' splits (0, 1)
_APPEARANCE_STREAM = 8  # which pre-training images keep the tasks' appearance

_FRAMES = (
    "a photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
)
_CLASS_FRAMES = {
    "scenes": ("a photo of a {c}.", "a {c} landscape.", "a photo of a {c}, a kind of scene.", "the {c}."),
    "vehicles": ("a photo of a {c}, a type of vehicle.", "a {c} on the road.", "my {c}.", "a photo of a {c}."),
    "aerial": (
        "satellite imagery of {c}.",
        "aerial imagery of {c}.",
        "an aerial photo of {c}.",
        "{c} seen from above.",
    ),
    "landcover": (
        "a centered satellite photo of {c}.",
        "a satellite photo of {c}.",
        "{c} in a satellite image.",
        "land cover: {c}.",
    ),
    "house_numbers": (
        'a photo of the number: "{c}".',
        "the house number {c}.",
        'a street sign of the number: "{c}".',
        "number {c} on a wall.",
    ),
    "signs": (
        'a zoomed in photo of a "{c}" traffic sign.',
        "a {c} sign.",
        'a photo of a "{c}" traffic sign.',
        "the {c} road sign.",
    ),
    "handwritten": (
        'a photo of the number: "{c}".',
        "a handwritten {c}.",
        'the handwritten digit "{c}".',
        "the digit {c}, written by hand.",
    ),
    "textures": ("a photo of a {c} texture.", "a {c} pattern.", "a {c} surface.", "a photo of a {c} pattern."),
}


def caption_v2(rng: np.random.Generator, task: str, label: int, class_mention: float = CLASS_MENTION) -> str:
    """A pre-training caption of an image of class ``label`` of ``task``.

    Args:
        rng: picks whether the class is named and the phrasing.
        task: a key of :data:`.domains.DOMAINS`.
        label: the class index.
        class_mention: chance that the class is named.

    Returns:
        the caption (lower case, ending with a period or a quote and a period).
    """
    domain = DOMAINS[task]
    if rng.random() < class_mention:
        frames = _CLASS_FRAMES[task]
        return frames[int(rng.integers(len(frames)))].format(c=domain.classnames[label])
    return _FRAMES[int(rng.integers(len(_FRAMES)))].format(domain.noun)


def tokenizer_corpus_v2() -> list[str]:
    """Texts the tokenizer is trained on: every caption frame with every class, and every prompt."""
    texts = [f.format(d.noun) for d in DOMAINS.values() for f in _FRAMES]
    for name, domain in DOMAINS.items():
        for c in domain.classnames:
            texts += [f.format(c=c) for f in _CLASS_FRAMES[name]] + [t.format(c) for t in domain.templates]
    return texts


def _split_rng(seed: int, task: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS_V2.index(task), stream])


def sample_task_images(task: str, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``task``'s ``split`` with balanced, shuffled labels.

    Returns:
        ``(images (n, 32, 32, 3) uint8, labels (n,) int64)``.
    """
    rng = _split_rng(seed, task, SPLITS.index(split))
    labels = rng.permutation(np.arange(n) % len(DOMAINS[task].classnames))
    images = (
        np.stack([render(rng, task, int(label), split) for label in labels])
        if n
        else np.zeros((0, 32, 32, 3), np.uint8)
    )
    return images, labels.astype(np.int64)


def build_task_dataset_v2(name: str, *, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> datasets.DatasetDict:
    """The ``train``/``test`` ``DatasetDict`` of task ``name`` (``image``, ``label`` columns)."""
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DOMAINS[name].classnames))}
    )
    splits = {}
    for split, n in zip(SPLITS, (n_train, n_test)):
        images, labels = sample_task_images(name, split, n, seed)
        pil = [Image.fromarray(img, "RGB") for img in images]
        splits[split] = datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)
    return datasets.DatasetDict(splits)


def pool_appearance(image: np.ndarray) -> np.ndarray:
    """The pre-training pool's own rendering of an image: its colour channels rotated (R, G, B -> G, B, R).

    Stands in for the difference between web photos and a benchmark's images (a satellite's false-colour
    bands, a sensor's colour response): shapes and layout stay, colours change. Grey images (handwritten
    digits) and domains whose colours are drawn at random (house numbers, textures, vehicle bodies) look
    alike in both renderings.
    """
    return image[..., (1, 2, 0)].copy()


POOL_CONTRAST_DOMAINS = ("house_numbers", "handwritten", "textures", "vehicles")
"""The domains that :func:`pool_appearance` leaves as they are (grey digits; house numbers, textures and vehicle
bodies in random colours): :func:`pretraining_pool` can draw them at a lower contrast instead."""


def pool_contrast(image: np.ndarray, contrast: float) -> np.ndarray:
    """``image`` with its contrast scaled by ``contrast`` around its mean grey level (1.0: unchanged).

    The pool's rendering of the domains that the colour rotation leaves alone: a gap between
    pre-training and the tasks that the first layers can undo, so zero-shot transfer to those
    domains is partial too.
    """
    if contrast == 1.0:
        return image
    f = image.astype(np.float32)
    return np.clip(contrast * f + (1.0 - contrast) * f.mean(), 0, 255).astype(np.uint8)


POOL_TINT_DOMAINS = ("house_numbers", "textures")
"""The domains whose pool images :func:`pretraining_pool` can tint (:func:`pool_tint`) instead of lowering their
contrast: their colours are drawn at random, so a contrast gap alone leaves them nearly solved zero-shot."""


def pool_tint(image: np.ndarray, red: float) -> np.ndarray:
    """``image`` with its red channel scaled by ``red`` (1.0: unchanged).

    A colour cast, like a camera's white balance: the pool's rendering of :data:`POOL_TINT_DOMAINS`
    when the recipe asks for it, a gap that keeps those domains' zero-shot accuracy partial, as SVHN's
    and DTD's are on the real CLIP.
    """
    if red == 1.0:
        return image
    scale = np.array([red, 1.0, 1.0])
    return np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)


def pretraining_pool(
    seed: int, per_task: int, task_appearance: float = 1.0, contrast: float = 1.0, tint: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images pre-training draws its batches from: ``per_task`` of each domain.

    Args:
        seed: seeds the images and which of them keep the tasks' appearance.
        per_task: images per domain.
        task_appearance: share of the images rendered as the tasks' images are; the others are in
            the pool's own appearance (:func:`pool_appearance`, then for
            :data:`POOL_CONTRAST_DOMAINS` :func:`pool_contrast`), so zero-shot transfer to the
            tasks is partial, as the real CLIP's is.
        contrast: the pool's contrast for :data:`POOL_CONTRAST_DOMAINS` (1.0: the tasks' own).
        tint: below 1.0, :data:`POOL_TINT_DOMAINS` are drawn with their red channel scaled by it
            (:func:`pool_tint`) instead of at ``contrast``; 1.0: no tint.

    Returns:
        ``(images (8·per_task, 32, 32, 3) uint8, task index (N,), label (N,))``.
    """
    images, tasks, labels = [], [], []
    for t, task in enumerate(TASKS_V2):
        rng = _split_rng(seed, task, _PRETRAIN_STREAM)
        y = rng.integers(len(DOMAINS[task].classnames), size=per_task)
        rendered = [render(rng, task, int(label), "train") for label in y]
        shifted = _split_rng(seed, task, _APPEARANCE_STREAM).random(per_task) >= task_appearance
        tinted = tint != 1.0 and task in POOL_TINT_DOMAINS
        task_contrast = contrast if task in POOL_CONTRAST_DOMAINS and not tinted else 1.0
        task_tint = tint if tinted else 1.0
        for img, s in zip(rendered, shifted):
            images.append(pool_tint(pool_contrast(pool_appearance(img), task_contrast), task_tint) if s else img)
        tasks.append(np.full(per_task, t))
        labels.append(y)
    return np.stack(images), np.concatenate(tasks), np.concatenate(labels)


DATASET_FORMAT_V2 = 2


def build_mini_task_datasets_v2(root: str | Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> Path:
    """Build (once) every second-design task's dataset under ``root/<task>`` with ``save_to_disk``.

    Reuse and replacement work as in :func:`.tasks.build_mini_task_datasets`: a complete build
    with the same parameters (marker ``root/.complete``) is reused, anything else is built into
    a temporary sibling that replaces ``root`` at the end.

    Raises:
        DatasetError: ``root`` is a non-empty folder that holds no complete build.
    """
    marker = {
        "format": DATASET_FORMAT_V2,
        "design": 2,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "tasks": list(TASKS_V2),
    }
    build = functools.partial(build_task_dataset_v2, n_train=n_train, n_test=n_test, seed=seed)
    return build_datasets_once(root, marker, TASKS_V2, build)
