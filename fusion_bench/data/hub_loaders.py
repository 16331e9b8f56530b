"""Loaders for hub datasets whose columns are not the ``image``/``label`` pair the task pools read.

Used as ``_target_`` of a dataset entry (see :mod:`fusion_bench.data.loading`), e.g.
``fer2013: {_target_: fusion_bench.data.hub_loaders.load_fer2013, split: test}``.
"""

from __future__ import annotations

from typing import Any

from fusion_bench.errors import DatasetError

__all__ = ["load_fer2013", "FER2013_HUB_ID"]

FER2013_HUB_ID = "clip-benchmark/wds_fer2013"
"""The FER2013 copy of the CLIP benchmark (webdataset columns ``jpg``, ``cls``, ``__key__``, ``__url__``)."""


def load_fer2013(split: str, path: str = FER2013_HUB_ID) -> Any:
    """FER2013's ``split`` with the webdataset columns renamed to ``image`` and ``label``.

    Args:
        split: ``"train"`` or ``"test"``.
        path: the hub id (or a local ``save_to_disk`` folder) of the webdataset copy.

    Raises:
        DatasetError: the dataset cannot be loaded or lacks the ``jpg``/``cls`` columns.
    """
    from fusion_bench.data.loading import load_dataset_from_config

    what = f"dataset 'fer2013' ({path})"
    dataset = load_dataset_from_config({"path": path, "split": split}, split=split, what=what)
    columns = list(getattr(dataset, "column_names", []))
    if not {"jpg", "cls"} <= set(columns):
        raise DatasetError(f"{what}: expected the webdataset columns 'jpg' and 'cls'; it has {columns}")
    extra = [c for c in ("__key__", "__url__") if c in columns]
    return dataset.remove_columns(extra).rename_columns({"jpg": "image", "cls": "label"})
