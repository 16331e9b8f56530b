"""Tiny ViT / ResNet image classifiers and their datasets, built locally (no hub access).

Used by the tests and by the offline classification example
(``${fusion_bench_classification_example:...}`` in the shipped configs):

* :func:`build_tiny_vit` / :func:`build_tiny_resnet` - a random tiny ``ViTForImageClassification``
  / ``ResNetForImageClassification`` saved with its own image processor;
* :func:`finetune_tiny_classifier` - a few epochs of the real framework
  (:class:`~fusion_bench.tasks.classification.ClassificationModule` on a ``lightning.Trainer``)
  on a dataset, saved with ``save_pretrained``;
* :func:`build_tiny_classification_example` - for both families, a "pre-trained" model (4 epochs
  on the union of the tasks, an 8-class head) and one fine-tuned model per task (6 epochs; heads
  of 3 and 5 classes), plus the tasks' datasets; built once and atomically (about 15 s of CPU).

Everything is seeded: building twice gives identical weights and images.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from fusion_bench.testing.build_cache import build_once
from fusion_bench.testing.tiny_datasets import build_tiny_image_dataset
from fusion_bench.testing.tokenizer import _quiet_progress

__all__ = [
    "CLASSIFICATION_TASKS",
    "ARCHITECTURES",
    "TinyClassificationExample",
    "build_tiny_vit",
    "build_tiny_resnet",
    "finetune_tiny_classifier",
    "build_tiny_classification_example",
]

FORMAT_VERSION = 2
ARCHITECTURES = ("vit", "resnet")
GRAYSCALE = ("shapes",)  # grayscale images for RGB models: the processors convert them
CLASSIFICATION_TASKS: dict[str, list[str]] = {
    "shapes": ["circle", "square", "triangle"],
    "textures": ["dots", "stripes", "checks", "waves", "noise"],
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tiny_vit(
    out_dir: str | Path, *, num_labels: int, seed: int = 0, image_size: int = 32, patch_size: int = 8
) -> Path:
    """Save a random tiny ``ViTForImageClassification`` (hidden 32, 2 layers) and its ``ViTImageProcessor``.

    Args:
        out_dir: the model folder.
        num_labels: size of its head.
        seed: seed of the weights.
        image_size / patch_size: the ViT's input size and patch size.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=patch_size,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    model.save_pretrained(str(out_dir))
    processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_resnet(out_dir: str | Path, *, num_labels: int, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random tiny ``ResNetForImageClassification`` (2 basic stages, widths 8 and 16, BatchNorm)
    with a ``ConvNextImageProcessor`` like ``microsoft/resnet-50``'s (crop_pct 0.875, ImageNet mean/std).

    Args:
        out_dir: the model folder.
        num_labels: size of its head.
        seed: seed of the weights.
        image_size: the processor's output size.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResNetForImageClassification(config)
    model.save_pretrained(str(out_dir))
    processor = ConvNextImageProcessor(
        size={"shortest_edge": image_size}, crop_pct=0.875, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    processor.save_pretrained(str(out_dir))
    return Path(out_dir)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up messages and its hints for tiny runs inside the block."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for hint in (
                "does not have many workers",
                "number of training batches",
                "across ranks is zero",
                "LeafSpec",
            ):
                warnings.filterwarnings("ignore", message=f".*{hint}.*")
            with _quiet_progress():
                yield
    finally:
        logger.setLevel(level)


def finetune_tiny_classifier(
    model_dir: str | Path,
    dataset: Any,
    out_dir: str | Path,
    *,
    max_epochs: int = 3,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    scratch_dir: str | Path,
) -> Path:
    """Fine-tune a saved classifier on ``dataset`` with the framework and save it.

    Args:
        model_dir: the starting model (its head is replaced when its size differs from the dataset's classes).
        dataset: any form :class:`~fusion_bench.tasks.classification.ImageClassificationDataModule` takes.
        out_dir: where the fine-tuned model (and processor) is saved.
        max_epochs / learning_rate / batch_size / seed: the run (AdamW, constant schedule, no validation).
        scratch_dir: Lightning's root dir for the run (figures land there).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import lightning as L

    from fusion_bench.tasks.classification import (
        ClassificationModule,
        ImageClassificationDataModule,
        processor_class_for,
    )
    from fusion_bench.tasks.classification.datamodule import label_info, load_splits
    from fusion_bench.tasks.common.base_module import BaseConfig

    splits = load_splits(dataset)
    num_classes, names = label_info(splits["train"], what="train split")
    config = BaseConfig(
        model_name=str(model_dir),
        num_classes=num_classes,
        class_names=names,
        learning_rate=learning_rate,
        batch_size=batch_size,
        scheduler="constant",
        seed=seed,
        val_fraction=0.0,
    )
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    processor = processor_class_for(model_type)(config)
    module = ClassificationModule(model_ckpt=str(model_dir), config=config, processor=processor)
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(scratch_dir),
        )
        trainer.fit(module, ImageClassificationDataModule(splits, processor=processor, config=config))
        module.save_pretrained(out_dir)
    return Path(out_dir)


@dataclass(frozen=True)
class TinyClassificationExample:
    """Paths of a built classification example (see :func:`build_tiny_classification_example`).

    Attributes:
        root: the example's folder.
        pretrained: architecture (``vit``, ``resnet``) -> its pre-trained model (``root/models/<arch>-tiny``).
        finetuned: architecture -> task -> fine-tuned model (``root/models/<arch>-tiny_<task>``).
        datasets: task -> its ``DatasetDict`` folder (``root/datasets/<task>``, splits train/test).
        tasks: task -> class names.
    """

    root: Path
    pretrained: dict[str, Path]
    finetuned: dict[str, dict[str, Path]]
    datasets: dict[str, Path]
    tasks: dict[str, list[str]]


def _layout(root: Path, tasks: Mapping[str, Sequence[str]]) -> TinyClassificationExample:
    models = root / "models"
    return TinyClassificationExample(
        root=root,
        pretrained={a: models / f"{a}-tiny" for a in ARCHITECTURES},
        finetuned={a: {t: models / f"{a}-tiny_{t}" for t in tasks} for a in ARCHITECTURES},
        datasets={t: root / "datasets" / t for t in tasks},
        tasks={t: list(c) for t, c in tasks.items()},
    )


def _union_dataset(paths: Mapping[str, Path]) -> Any:
    """The tasks' training images with labels offset per task (the "pre-training" data)."""
    import datasets

    images, labels, names = [], [], []
    for task, path in paths.items():
        train = datasets.load_from_disk(str(path))["train"]
        images += list(train["image"])
        labels += [len(names) + int(label) for label in train["label"]]
        names += [f"{task}:{n}" for n in train.features["label"].names]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
    )


def _build_into(root: Path, tasks: Mapping[str, Sequence[str]], seed: int) -> None:
    with _quiet_lightning():
        _build_parts(root, tasks, seed)


def _build_parts(root: Path, tasks: Mapping[str, Sequence[str]], seed: int) -> None:
    paths, scratch = _layout(root, tasks), root / "_scratch"
    for i, (task, names) in enumerate(tasks.items()):
        build_tiny_image_dataset(
            paths.datasets[task],
            classnames=names,
            n_train_per_class=8,
            n_test_per_class=4,
            seed=seed + 101 + i,
            mode="L" if task in GRAYSCALE else "RGB",
        )
    union = _union_dataset(paths.datasets)
    builders = {"vit": build_tiny_vit, "resnet": build_tiny_resnet}
    for arch in ARCHITECTURES:
        random_init = builders[arch](
            scratch / f"{arch}-random", num_labels=union["train"].features["label"].num_classes, seed=seed
        )
        finetune_tiny_classifier(
            random_init, union, paths.pretrained[arch], max_epochs=4, seed=seed, scratch_dir=scratch
        )
        for i, task in enumerate(tasks):
            finetune_tiny_classifier(
                paths.pretrained[arch],
                str(paths.datasets[task]),
                paths.finetuned[arch][task],
                max_epochs=6,
                seed=seed + 1 + i,
                scratch_dir=scratch,
            )
    shutil.rmtree(scratch, ignore_errors=True)


def build_tiny_classification_example(
    root: str | Path, *, tasks: Mapping[str, Sequence[str]] | None = None, seed: int = 0
) -> TinyClassificationExample:
    """Build (once) the tiny ViT and ResNet example: pre-trained models, one fine-tuned model per task, datasets.

    A complete example with the same marker (format, seed, tasks) is returned as is; else the
    build goes to a temporary sibling folder renamed into place at the end.

    Args:
        root: the example's folder.
        tasks: task -> class names; default :data:`CLASSIFICATION_TASKS` (``shapes`` is grayscale).
        seed: base seed of everything.

    Returns:
        the example's paths.
    """
    tasks = {t: list(c) for t, c in (tasks or CLASSIFICATION_TASKS).items()}
    root = Path(root).expanduser().absolute()
    marker = {"format": FORMAT_VERSION, "seed": seed, "tasks": tasks}
    build_once(root, marker, lambda tmp: _build_into(tmp, tasks, seed))
    return _layout(root, tasks)
