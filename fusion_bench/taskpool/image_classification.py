"""Evaluate an image classifier (ViT, ResNet) on several tasks, each with its own head.

For every task the evaluated model's backbone gets that task's classification head — read
from the task's fine-tuned checkpoint in ``classification_heads`` (only its ``classifier.*``
tensors and config; the backbone is not read) — so a merged backbone is judged as "merged
backbone + each task's head". Without ``classification_heads`` the model is evaluated with
its own head on every task (a single fine-tuned model).

BatchNorm (ResNet): ``batchnorm="recompute_per_task"`` (default) re-estimates the running
statistics of each task's model on the first ``batchnorm_num_samples`` images of that task's
*training* split (``train_datasets``), ``"recompute_shared"`` once on the union of those
images, ``"keep"`` evaluates the statistics the model carries; see
:mod:`fusion_bench.models.batchnorm` for why merged statistics must be recomputed. Models
without BatchNorm (ViT) are evaluated as they are.

Per task: top-1 accuracy over all samples and cross-entropy averaged over samples, as in
:class:`~fusion_bench.taskpool.CLIPVisionModelTaskPool`; ``average`` is the unweighted mean.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fusion_bench.data.loading import (
    ImageClassificationCollate,
    check_image_classification_columns,
    load_dataset_from_config,
)
from fusion_bench.errors import ConfigError, DatasetError, ModelLoadError
from fusion_bench.modelpool.image_classification import HFImageClassificationModelPool, is_image_classifier
from fusion_bench.models.batchnorm import has_batchnorm, recompute_batchnorm_statistics
from fusion_bench.taskpool.base_pool import register_taskpool
from fusion_bench.taskpool.classification import (
    ClassificationTaskPool,
    evaluate_classifier,
    fast_dev_run_limit,
    sharded_test_loader,
)
from fusion_bench.taskpool.task_groups import mean_over_tasks
from fusion_bench.tasks.classification.datamodule import label_info
from fusion_bench.tasks.classification.processor import (
    ClassificationProcessor,
    load_image_processor,
    processor_class_for,
)
from fusion_bench.utils.instantiate import to_container

__all__ = ["ImageClassificationTaskPool", "BATCHNORM_MODES"]

BATCHNORM_MODES = ("recompute_per_task", "recompute_shared", "keep")


def _mapping(value: Any, option: str, *, required: bool = False) -> dict[str, Any]:
    value = to_container(value)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping) or (required and not value):
        raise ConfigError(
            f"taskpool: {option!r} must be a {'non-empty ' if required else ''}mapping of task -> entry, got {value!r}"
        )
    return {str(k): v for k, v in value.items()}


@register_taskpool("ImageClassificationTaskPool", "image_classification")
class ImageClassificationTaskPool(ClassificationTaskPool):
    """Accuracy and loss of an image classifier per task (see module docstring).

    Args:
        test_datasets: ``{task: dataset entry}`` (columns ``image``, ``label``).
        classification_heads: ``{task: model entry}``, the fine-tuned model whose head the task
            uses (None: the evaluated model's own head for every task).
        train_datasets: ``{task: dataset entry}`` for recomputing BatchNorm statistics.
        processor: the image processor (hub id or folder; None: each task's head checkpoint's,
            else required).
        batchnorm: ``recompute_per_task``, ``recompute_shared`` or ``keep``.
        batchnorm_num_samples: training images per task for the recomputation.
        dataloader_kwargs: ``DataLoader`` options (``batch_size`` default 128, ``num_workers``).
        fast_dev_run: ``True`` evaluates one batch per task, an int that many; reports say so.
    """

    def __init__(
        self,
        test_datasets: Mapping[str, Any],
        *,
        classification_heads: Mapping[str, Any] | None = None,
        train_datasets: Mapping[str, Any] | None = None,
        processor: Any = None,
        batchnorm: str = "recompute_per_task",
        batchnorm_num_samples: int = 256,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        fast_dev_run: bool | int = False,
    ) -> None:
        self._dataset_cfgs = _mapping(test_datasets, "test_datasets", required=True)
        heads = _mapping(classification_heads, "classification_heads")
        missing = [t for t in self._dataset_cfgs if heads and t not in heads]
        if missing:
            raise ConfigError(
                f"taskpool: no classification_heads entry for task(s) {missing}; heads given: {sorted(heads)}"
            )
        self.head_pool = HFImageClassificationModelPool(heads) if heads else None
        self._train_cfgs = _mapping(train_datasets, "train_datasets")
        if processor is None and self.head_pool is None:
            raise ConfigError("taskpool: give 'processor' (the image processor) when there are no classification_heads")
        self._processor_cfg = to_container(processor)
        if batchnorm not in BATCHNORM_MODES:
            raise ConfigError(
                f"taskpool: option 'batchnorm' must be one of {', '.join(map(repr, BATCHNORM_MODES))}; got {batchnorm!r}"
            )
        if (
            isinstance(batchnorm_num_samples, bool)
            or not isinstance(batchnorm_num_samples, int)
            or batchnorm_num_samples < 1
        ):
            raise ConfigError(
                f"taskpool: option 'batchnorm_num_samples' must be an integer >= 1; got {batchnorm_num_samples!r}"
            )
        self.batchnorm, self.batchnorm_num_samples = batchnorm, batchnorm_num_samples
        self.dataloader_kwargs = {"batch_size": 128, **dict(to_container(dataloader_kwargs) or {})}
        self.dataloader_kwargs.pop("shuffle", None)
        self.fast_dev_run = fast_dev_run
        self._datasets: dict[tuple[str, str], Any] = {}
        self._processors: dict[str, Any] = {}
        self._num_samples: dict[str, int] = {}
        self._batchnorm_used = "none in model"

    # ---- data ----------------------------------------------------------------------------------
    def _dataset(self, split: str, task: str) -> Any:
        if (split, task) not in self._datasets:
            cfgs = self._dataset_cfgs if split == "test" else self._train_cfgs
            what = f"{split} dataset {task!r}"
            dataset = load_dataset_from_config(cfgs[task], split=split, what=what)
            check_image_classification_columns(dataset, what=what)
            self._datasets[(split, task)] = dataset
        return self._datasets[(split, task)]

    def image_processor(self, task: str) -> Any:
        """The image processor used for ``task``'s images."""
        if task not in self._processors:
            if self._processor_cfg is not None:
                cfg = self._processor_cfg
                path = cfg.get("pretrained_model_name_or_path") if isinstance(cfg, Mapping) else cfg
            else:
                path = self.head_pool.get_model_config(task)["pretrained_model_name_or_path"]
            self._processors[task] = load_image_processor(str(path), what=f"taskpool image processor of {task!r}")
        return self._processors[task]

    def _loader(self, dataset: Any, task: str) -> DataLoader:
        collate = ImageClassificationCollate(self.image_processor(task))
        return DataLoader(dataset, shuffle=False, collate_fn=collate, **self.dataloader_kwargs)

    def _pixel_batches(self, tasks: list[str], device: torch.device) -> Iterator[torch.Tensor]:
        """The first ``batchnorm_num_samples`` training images of each task, as pixel batches."""
        for task in tasks:
            if task not in self._train_cfgs:
                raise ConfigError(
                    f"taskpool: batchnorm={self.batchnorm!r} needs a train dataset for task {task!r} "
                    f"(train_datasets); or set batchnorm=keep"
                )
            train = self._dataset("train", task)
            subset = Subset(train, range(min(self.batchnorm_num_samples, len(train))))
            for pixels, _ in self._loader(subset, task):
                yield pixels.to(device)

    # ---- models --------------------------------------------------------------------------------
    def _processor_class(self, model: nn.Module) -> type[ClassificationProcessor]:
        if not is_image_classifier(model):
            raise ModelLoadError(f"the model to evaluate is a {type(model).__name__}, not a supported image classifier")
        return processor_class_for(model.config.model_type)

    def task_model(self, model: nn.Module, task: str) -> nn.Module:
        """``model`` with ``task``'s head (a copy), or ``model`` itself without ``classification_heads``."""
        if self.head_pool is None:
            return model
        head = self.head_pool.head_state_dict(task)
        return self._processor_class(model).with_head(model, head, what=f"classification head of {task!r}")

    def _check_labels(self, task: str, num_classes: int) -> None:
        num, _ = label_info(self._dataset("test", task), what=f"test dataset {task!r}")
        if num > num_classes:
            raise DatasetError(f"test dataset {task!r} has {num} classes but its classification head has {num_classes}")

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Evaluate ``model`` on every task with that task's head.

        Returns:
            ``{task: {"accuracy", "loss"}, ..., "average": {...}}``.
        """
        self._processor_class(model)
        device = self.fabric.device if self.fabric is not None else next(model.parameters()).device
        model = model.to(device).eval()
        recompute = self.batchnorm != "keep" and has_batchnorm(model)
        self._batchnorm_used = self.batchnorm if recompute else ("keep" if has_batchnorm(model) else "none in model")
        if recompute and self.batchnorm == "recompute_shared":
            model = _with_recomputed_statistics(model, self._pixel_batches(self.task_names, device))
        report: dict[str, Any] = {}
        for task in self.task_names:
            task_model = self.task_model(model, task).to(device).eval()
            if recompute and self.batchnorm == "recompute_per_task":
                task_model = _with_recomputed_statistics(task_model, self._pixel_batches([task], device))
            report[task] = self._evaluate_task(task_model, task, device)
        report["average"] = mean_over_tasks(report, self.task_names)
        return report

    def _evaluate_task(self, model: nn.Module, task: str, device: torch.device) -> dict[str, float]:
        self._check_labels(task, int(model.config.num_labels))
        limit = fast_dev_run_limit(self.fast_dev_run, int(self.dataloader_kwargs["batch_size"]))
        collate = ImageClassificationCollate(self.image_processor(task))
        loader = sharded_test_loader(
            self._dataset("test", task), collate, self.dataloader_kwargs, fabric=self.fabric, limit=limit
        )
        metrics, self._num_samples[task] = evaluate_classifier(
            lambda pixels: model(pixel_values=pixels).logits,
            loader,
            device=device,
            dtype=next(model.parameters()).dtype,
            fabric=self.fabric,
            desc=f"eval {task}",
            what=f"test dataset {task!r}",
        )
        return metrics

    def evaluation_meta(self) -> dict[str, Any]:
        """Samples per task, the loss reduction, partial runs and how BatchNorm statistics were set."""
        return {**super().evaluation_meta(), "batchnorm": self._batchnorm_used}


def _with_recomputed_statistics(model: nn.Module, batches: Iterator[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are recomputed on ``batches``."""
    model = copy.deepcopy(model)
    if recompute_batchnorm_statistics(model, batches, forward=lambda m, x: m(pixel_values=x)) == 0:
        raise DatasetError("no training images to recompute the BatchNorm statistics on")
    return model
