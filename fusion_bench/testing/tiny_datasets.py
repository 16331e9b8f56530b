"""Generated image-classification datasets: class-dependent seeded images saved as a ``DatasetDict``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fusion_bench.testing.tokenizer import _quiet_progress

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["build_tiny_image_dataset"]

GRAYSCALE_TASKS = ("mnist",)


def _class_image(rng: np.random.Generator, label: int, n_classes: int, size: int, mode: str) -> PILImage:
    """One generated image of class ``label``: its own stripes, tint and bright square, plus noise.

    Stripe angle and frequency and the square's position depend on the class (so they survive
    conversion to grayscale); the tint adds a colour cue in RGB.

    Args:
        rng: the random generator (noise and a small random shift of the square).
        label: the class index.
        n_classes: number of classes.
        size: image side in pixels.
        mode: PIL mode of the result (``"RGB"``, ``"L"``, ...).

    Returns:
        the PIL image.
    """
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / max(n_classes, 1)
    phase = (2 + label % 4) * (xx * np.cos(angle) + yy * np.sin(angle))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    tint = 0.5 + 0.35 * np.array([np.sin(label + 0.5), np.cos(1.7 * label), np.sin(2.3 * label + 1.0)])
    img = 0.15 + 0.6 * stripes[..., None] * tint[None, None, :]
    q = max(size // 4, 1)
    row, col = (label * 3 % 4) * q, (label % 4) * q
    dr, dc = rng.integers(-1, 2, size=2)
    img[max(row + dr, 0) : row + dr + q, max(col + dc, 0) : col + dc + q] = 1.0
    img = img + rng.normal(0.0, 0.08, img.shape)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), "RGB").convert(mode)


def build_tiny_image_dataset(
    out_dir: str | Path,
    *,
    classnames: Sequence[str],
    n_train_per_class: int = 4,
    n_test_per_class: int = 4,
    seed: int = 0,
    image_size: int = 32,
    mode: str = "RGB",
) -> Path:
    """Save a ``datasets.DatasetDict`` of generated, class-dependent images with ``save_to_disk``.

    Args:
        out_dir: the dataset folder.
        classnames: class names (``label`` is a ``ClassLabel`` over them).
        n_train_per_class: images per class in ``train``.
        n_test_per_class: images per class in ``test``.
        seed: seed of the noise.
        image_size: image side in pixels.
        mode: PIL mode of the images (``"L"`` for grayscale).

    Returns:
        ``out_dir`` as a ``Path``; reload it with ``datasets.load_from_disk``.
    """
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))})
    splits = {}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = [label for _ in range(per_class) for label in range(len(classnames))]
        images = [_class_image(rng, label, len(classnames), image_size, mode) for label in labels]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    with _quiet_progress():
        datasets.DatasetDict(splits).save_to_disk(str(out_dir))
    return Path(out_dir)
