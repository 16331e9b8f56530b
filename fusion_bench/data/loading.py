"""Load datasets from config entries: hub ids, local ``save_to_disk`` folders, or Hydra targets.

A dataset entry in a pool config may be
  * a string: a hub id (``tanganke/sun397``) or a local folder written by ``save_to_disk``;
  * a mapping ``{path, name?, split?, data_dir?, revision?}`` passed to
    ``datasets.load_dataset`` (``path`` may be ``imagefolder`` with ``data_dir``), or to
    ``datasets.load_from_disk`` when ``path`` is such a local folder;
  * a mapping with ``_target_`` (called with its other keys).

Any mapping entry may add ``corruption`` (one of
:data:`fusion_bench.data.corruptions.CORRUPTIONS`), ``severity`` (1-5), ``seed``, ``table``
(``imagenet``/``cifar`` parameters) and ``crop_size``: the loaded images are then corrupted on
the fly, deterministically per image (:class:`~fusion_bench.data.corruptions.CorruptedImageDataset`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fusion_bench.data.corruptions import CorruptedImageDataset, CorruptionSpec
from fusion_bench.errors import DatasetError
from fusion_bench.utils.instantiate import call_with_options, resolve_target, to_container

__all__ = [
    "load_dataset_from_config",
    "split_corruption_options",
    "is_saved_to_disk",
    "check_image_classification_columns",
    "ImageClassificationCollate",
]

_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_saved_to_disk(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / m).is_file() for m in _DISK_MARKERS)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def _pick_split(ds: Any, split: str | None, *, what: str) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise DatasetError(f"{what}: the dataset has splits {sorted(ds)}; choose one with 'split'")
        if split not in ds:
            raise DatasetError(f"{what}: no split {split!r}; available splits: {sorted(ds)}")
        return ds[split]
    return ds


def load_dataset_from_config(cfg: Any, *, split: str | None, what: str) -> Any:
    """Load one split of a dataset described by ``cfg`` (see module docstring).

    Args:
        cfg: the dataset entry.
        split: the split to use unless the entry names one.
        what: the entry's name for messages (e.g. ``"test dataset 'sun397'"``).

    Returns:
        a ``datasets.Dataset`` (or whatever a ``_target_`` returns), wrapped in a
        :class:`CorruptedImageDataset` if the entry asks for a corruption.
    """
    cfg, corruption = split_corruption_options(cfg, what=what)
    dataset = _load_uncorrupted(cfg, split=split, what=what)
    return dataset if corruption is None else CorruptedImageDataset(dataset, corruption)


def split_corruption_options(cfg: Any, *, what: str) -> tuple[dict[str, Any], CorruptionSpec | None]:
    """Normalise a dataset entry to a mapping and take its corruption options out (validated).

    Args:
        cfg: the dataset entry (see module docstring).
        what: the entry's name for messages.

    Returns:
        ``(entry without the corruption keys, the corruption or None)``.
    """
    cfg = to_container(cfg)
    if isinstance(cfg, str):
        cfg = {"path": cfg}
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"{what}: expected a path string or a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    return cfg, CorruptionSpec.pop_from(cfg, what=what)


def _load_uncorrupted(cfg: dict[str, Any], *, split: str | None, what: str) -> Any:
    import datasets

    if "_target_" in cfg:
        fn = resolve_target(cfg.pop("_target_"), what=what)
        return call_with_options(fn, cfg, what=what)
    cfg.setdefault("split", split)
    path = cfg.get("path") or cfg.get("name")
    if not path:
        raise DatasetError(f"{what}: the entry needs 'path' (hub id or local folder); got keys {sorted(cfg)}")
    path = str(path)
    if is_saved_to_disk(path):
        return _pick_split(_load_from_disk(path, what=what), cfg["split"], what=what)
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise DatasetError(f"{what}: local path {path!r} does not exist")
    kwargs = {k: v for k, v in cfg.items() if k not in ("path",)}
    if "path" not in cfg:  # legacy {name: hub_id}
        kwargs.pop("name")
    try:
        return datasets.load_dataset(path, **kwargs)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        raise DatasetError(f"{what}: cannot load dataset {path!r} ({err.__class__.__name__}: {err})") from None


def _load_from_disk(path: str, *, what: str) -> Any:
    """``datasets.load_from_disk``; a damaged folder (truncated ``.arrow``, bad JSON) is a
    :class:`DatasetError` naming ``what`` and the path."""
    import datasets

    try:
        return datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as err:  # pyarrow.ArrowInvalid, OSError, JSONDecodeError...: the files are damaged
        first = (str(err).splitlines() or [""])[0][:200]
        raise DatasetError(
            f"{what}: cannot read the saved dataset {path!r} ({err.__class__.__name__}: {first}); "
            "delete it to have it generated again, or restore it"
        ) from None


def check_image_classification_columns(dataset: Any, *, what: str) -> None:
    """Raise :class:`DatasetError` unless ``dataset`` has ``image`` and ``label`` columns."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return  # a custom torch dataset: checked when a sample is read
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DatasetError(
            f"{what}: missing column(s) {missing}; it has {list(columns)} (expected 'image' and 'label')"
        )


class ImageClassificationCollate:
    """Dataset rows ``{"image": PIL image, "label": int}`` -> ``(pixel_values, labels)``.

    Images are converted to RGB first (grayscale MNIST, palette PNGs), then preprocessed by
    ``image_processor`` (a Hugging Face image processor, or any callable taking
    ``images=[...]`` and ``return_tensors="pt"``). A top-level class, so DataLoader workers
    can pickle it. A Hugging Face tensor (torchvision) processor is asked to process the images of
    one size together (``disable_grouping=False``; on the CPU it would otherwise resize, crop and
    normalise them one by one): the same values, bit for bit, in fewer operations.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.processor_kwargs = grouping_kwargs(image_processor)

    def __call__(self, rows: list[Mapping[str, Any]]) -> tuple[Any, Any]:
        import torch

        images = [row["image"].convert("RGB") for row in rows]
        pixels = self.image_processor(images=images, return_tensors="pt", **self.processor_kwargs)["pixel_values"]
        return pixels, torch.tensor([int(row["label"]) for row in rows])


def grouping_kwargs(image_processor: Any) -> dict[str, Any]:
    """``{"disable_grouping": False}`` for a Hugging Face torchvision-backed image processor, else ``{}``."""
    import sys

    if "transformers" not in sys.modules:  # not a Hugging Face processor: no need to import transformers
        return {}
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # another transformers version: leave the processor's defaults
        return {}
    return {"disable_grouping": False} if isinstance(image_processor, TorchvisionBackend) else {}
