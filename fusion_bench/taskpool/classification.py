"""The image-classification evaluation loop shared by the task pools.

Top-1 accuracy over all samples and cross-entropy averaged over *samples* (the reference
implementation averaged batch means; the two differ when the last batch is short).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fusion_bench.errors import DatasetError
from fusion_bench.taskpool.base_pool import BaseTaskPool
from fusion_bench.utils.distributed import ShardSampler, global_rank, is_global_zero, sum_across_ranks, world_size

__all__ = [
    "LOSS_REDUCTION",
    "ClassificationTaskPool",
    "fast_dev_run_limit",
    "sharded_test_loader",
    "evaluate_classifier",
    "dataset_num_classes",
    "check_num_classes",
]

LOSS_REDUCTION = "cross-entropy averaged over samples"


class ClassificationTaskPool(BaseTaskPool):
    """What the image-classification task pools share: task names from their test datasets and the report's meta.

    Subclasses set ``_dataset_cfgs`` (``{task: test dataset entry}``) and ``fast_dev_run`` in their constructor
    and record each task's evaluated sample count in ``_num_samples``.
    """

    _dataset_cfgs: dict[str, Any]
    fast_dev_run: bool | int

    @property
    def task_names(self) -> list[str]:
        return list(self._dataset_cfgs)

    def evaluation_meta(self) -> dict[str, Any]:
        """Samples per task, the loss reduction and whether the run was partial."""
        return {
            "loss_reduction": LOSS_REDUCTION,
            "num_samples": dict(getattr(self, "_num_samples", {})),
            "fast_dev_run": bool(self.fast_dev_run),
        }


def fast_dev_run_limit(fast_dev_run: bool | int, batch_size: int) -> int | None:
    """The samples a task's evaluation uses: all (None), or ``fast_dev_run`` batches' worth (``True``: one)."""
    if not fast_dev_run:
        return None
    return batch_size * (1 if fast_dev_run is True else int(fast_dev_run))


def sharded_test_loader(
    dataset: Any,
    collate: Callable[[list[Any]], Any],
    dataloader_kwargs: Mapping[str, Any],
    *,
    fabric: Any = None,
    limit: int | None = None,
) -> DataLoader:
    """A test loader over the first ``limit`` samples (None: all), in order, this rank's shard only.

    Every task pool evaluates through it, so data-parallel runs split each test set between the
    devices (see :class:`~fusion_bench.utils.distributed.ShardSampler`) and
    :func:`evaluate_classifier` adds the shards' counts.
    """
    num = len(dataset) if limit is None else min(limit, len(dataset))
    sampler = ShardSampler(num, rank=global_rank(fabric), world_size=world_size(fabric))
    kwargs = {k: v for k, v in dataloader_kwargs.items() if k != "shuffle"}
    return DataLoader(dataset, sampler=sampler, collate_fn=collate, **kwargs)


@torch.inference_mode()
def evaluate_classifier(
    classifier: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_batches: int | None = None,
    fabric: Any = None,
    desc: str = "eval",
    what: str = "the test dataset",
) -> tuple[dict[str, float], int]:
    """Accuracy and sample-averaged loss of ``classifier`` over ``batches``.

    Under data-parallel evaluation each rank passes its own shard of the samples; the ranks'
    counts and float64 loss sums are added, so any number of devices gives one device's numbers.

    Args:
        classifier: pixel values (B, 3, H, W) -> logits (B, C).
        batches: ``(pixel_values, labels)`` (this rank's shard).
        device / dtype: where and in which dtype the pixel values go.
        max_batches: stop after this many batches (None: all).
        fabric: the program's ``lightning.Fabric`` (None: one process).
        desc: progress bar label (shown on rank 0 only).
        what: names the dataset in messages.

    Returns:
        ``({"accuracy", "loss"}, number of samples over all ranks)``.

    Raises:
        DatasetError: no sample was seen.
    """
    correct, loss_sum, count = 0, 0.0, 0
    progress = None if is_global_zero(fabric) else True  # tqdm: disable=None shows it on a terminal
    for i, (pixels, labels) in enumerate(tqdm(batches, desc=desc, leave=False, disable=progress)):
        if max_batches is not None and i >= max_batches:
            break
        logits = classifier(pixels.to(device=device, dtype=dtype))  # (B, C)
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits.double(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        count += labels.numel()
    correct, loss_sum, count = sum_across_ranks(fabric, [correct, loss_sum, count])
    if count == 0:
        raise DatasetError(f"{what} is empty")
    return {"accuracy": correct / count, "loss": loss_sum / count}, int(count)


def dataset_num_classes(dataset: Any) -> tuple[int | None, bool]:
    """``(number of classes, exact)``: the ``ClassLabel`` size (exact), else max label + 1 (a lower
    bound), else ``(None, False)`` for datasets without columns."""
    feature = dataset.features.get("label") if hasattr(dataset, "features") else None
    if getattr(feature, "num_classes", None) is not None:
        return int(feature.num_classes), True
    if hasattr(dataset, "column_names") and "label" in dataset.column_names:
        labels = dataset["label"]
        return (int(max(labels)) + 1 if len(labels) else 0), False
    return None, False


def check_num_classes(dataset: Any, num_classes: int, *, what: str, against: str) -> None:
    """Raise :class:`DatasetError` unless ``dataset``'s labels fit ``num_classes`` classes.

    Args:
        dataset: the dataset.
        num_classes: how many classes the classifier has.
        what: names the dataset (``"test dataset 'mnist'"``).
        against: names the classifier side (``"class names"``, ``"rows in its classification head"``).
    """
    found, exact = dataset_num_classes(dataset)
    if found is None:
        return
    if exact and found != num_classes:
        raise DatasetError(f"{what}: the dataset has {found} classes but {num_classes} {against}")
    if not exact and found > num_classes:
        raise DatasetError(f"{what}: label {found - 1} out of range for {num_classes} {against}")
