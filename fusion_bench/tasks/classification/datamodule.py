"""``ImageClassificationDataModule``: a ``LightningDataModule`` over any ``datasets`` image dataset.

The dataset may be a ``datasets.DatasetDict``, a hub id or local ``save_to_disk`` folder
(all splits are read), a ``{path, name?, ...}`` entry for ``datasets.load_dataset``, or a
mapping ``{split: entry or Dataset}``. Columns are renamed to ``image``/``label``; labels are
checked against ``num_classes`` before any batch is drawn (a ``ClassLabel`` feature gives
the class count and names; plain integer labels must lie in ``[0, num_classes)``). Without
a validation split, ``val_fraction`` of the training split is held out (seeded).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from fusion_bench.data.loading import (
    ImageClassificationCollate,
    check_image_classification_columns,
    is_saved_to_disk,
    load_dataset_from_config,
)
from fusion_bench.errors import DatasetError
from fusion_bench.tasks.classification.processor import ClassificationProcessor
from fusion_bench.tasks.common.base_module import BaseConfig

__all__ = ["ImageClassificationDataModule", "load_splits", "label_info"]


def load_splits(dataset: Any, *, what: str = "dataset") -> dict[str, Any]:
    """``{split: datasets.Dataset}`` from any of the forms in the module docstring."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return dict(dataset)
    if isinstance(dataset, datasets.Dataset):
        return {"train": dataset}
    if isinstance(dataset, (str, Path)) and is_saved_to_disk(dataset):
        return load_splits(datasets.load_from_disk(str(Path(dataset).expanduser())), what=what)
    if isinstance(dataset, Mapping) and dataset and "path" not in dataset and "_target_" not in dataset:
        return {str(split): _one_split(entry, str(split), what=what) for split, entry in dataset.items()}
    loaded = load_dataset_from_config(dataset, split=None, what=what)
    return load_splits(loaded, what=what)


def _one_split(entry: Any, split: str, *, what: str) -> Any:
    import datasets

    if isinstance(entry, datasets.Dataset):
        return entry
    return load_dataset_from_config(entry, split=split, what=f"{what} split {split!r}")


def label_info(dataset: Any, *, what: str) -> tuple[int, list[str] | None]:
    """(number of classes, class names or None) of a dataset with a ``label`` column.

    A ``ClassLabel`` feature gives both; else the count is ``max(label) + 1``.

    Raises:
        DatasetError: a label is negative.
    """
    feature = dataset.features.get("label") if hasattr(dataset, "features") else None
    if getattr(feature, "num_classes", None) is not None:
        return int(feature.num_classes), list(feature.names)
    labels = torch.as_tensor(dataset["label"])
    if labels.numel() and int(labels.min()) < 0:
        raise DatasetError(f"{what}: label {int(labels.min())} is negative; labels must be 0 .. num_classes-1")
    return (int(labels.max()) + 1 if labels.numel() else 0), None


class ImageClassificationDataModule(L.LightningDataModule):
    """Train/val/test loaders of an image-classification dataset (see module docstring).

    Args:
        dataset: the dataset (any form of :func:`load_splits`).
        processor: turns PIL images into pixel values (training batches get its augmentations).
        config: batch sizes, workers, seed, ``val_fraction``, ``num_classes``, ``class_names``
            (None: the processor's config).
        train_split / val_split / test_split: split names (a missing val/test split is allowed).
        image_column / label_column: the dataset's column names.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        processor: ClassificationProcessor,
        config: BaseConfig | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        super().__init__()
        self.dataset, self.processor = dataset, processor
        self.config = config or processor.config
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.columns = (image_column, label_column)
        self.splits: dict[str, Any] | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None

    # ---- setup -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the splits (once), rename columns, check labels, hold out validation data."""
        if self.splits is not None:
            return
        raw = load_splits(self.dataset)
        train_name = self.split_names["train"]
        if train_name not in raw and stage in (None, "fit"):
            raise DatasetError(f"dataset: no split {train_name!r}; available splits: {sorted(raw)}")
        splits = {k: self._columns(raw[name], name) for k, name in self.split_names.items() if name in raw}
        self.num_classes, self.class_names = self._check_labels(splits)
        if "val" not in splits and "train" in splits and self.config.val_fraction > 0:
            splits["train"], splits["val"] = self._hold_out(splits["train"])
        self.splits = splits

    def _columns(self, dataset: Any, split: str) -> Any:
        image, label = self.columns
        if hasattr(dataset, "rename_columns"):
            names = {
                old: new
                for old, new in ((image, "image"), (label, "label"))
                if old != new and old in dataset.column_names
            }
            dataset = dataset.rename_columns(names) if names else dataset
        check_image_classification_columns(dataset, what=f"dataset split {split!r}")
        return dataset

    def _check_labels(self, splits: Mapping[str, Any]) -> tuple[int, list[str] | None]:
        cfg = self.config
        counts = {k: label_info(ds, what=f"dataset split {self.split_names[k]!r}") for k, ds in splits.items()}
        names = next((n for _, n in counts.values() if n is not None), None)
        if names is not None:
            num = len(names)
            if cfg.num_classes is not None and cfg.num_classes != num:
                raise DatasetError(
                    f"dataset: its 'label' ClassLabel has {num} classes but num_classes={cfg.num_classes}; "
                    f"set num_classes={num}"
                )
        else:
            num = max(c for c, _ in counts.values())
            if cfg.num_classes is not None and num > cfg.num_classes:
                raise DatasetError(f"dataset: label {num - 1} is out of range for num_classes={cfg.num_classes}")
            num = cfg.num_classes or num
        if cfg.class_names is not None and len(cfg.class_names) != num:
            raise DatasetError(f"dataset: {len(cfg.class_names)} class_names given but the dataset has {num} classes")
        return num, list(cfg.class_names or names or []) or None

    def _hold_out(self, train: Any) -> tuple[Any, Any]:
        n = len(train)
        n_val = max(1, int(round(n * self.config.val_fraction)))
        if n - n_val < 1:
            raise DatasetError(
                f"dataset: {n} training sample(s) are too few to hold out a validation split; set val_fraction=0"
            )
        parts = train.train_test_split(test_size=n_val, seed=self.config.seed, shuffle=True)
        return parts["train"], parts["test"]

    # ---- loaders ---------------------------------------------------------------------------
    def _split(self, key: str) -> Any:
        self.setup()
        if key not in self.splits:
            raise DatasetError(f"dataset: no {key} split {self.split_names[key]!r}; available: {sorted(self.splits)}")
        return self.splits[key]

    def has_split(self, key: str) -> bool:
        """Whether the ``train``/``val``/``test`` split exists (after :meth:`setup`)."""
        self.setup()
        return key in self.splits

    def _loader(self, key: str, *, train: bool) -> DataLoader:
        cfg = self.config
        collate = ImageClassificationCollate(functools.partial(self.processor, train=train))
        generator = torch.Generator().manual_seed(cfg.seed) if train else None
        return DataLoader(
            self._split(key),
            batch_size=cfg.batch_size if train else cfg.eval_batch,
            shuffle=train,
            generator=generator,
            num_workers=cfg.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if self.has_split("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
