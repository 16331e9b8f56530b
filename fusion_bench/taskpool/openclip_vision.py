"""Evaluation of OpenCLIP image encoders with per-task classification heads (task_vectors' setup).

Logits = ``head(encoder(image))`` where each task's head is a ``Linear`` over normalised
features (task_vectors' ``ClassificationHead``: rows = ``exp(logit_scale)`` × zero-shot class
embeddings). Images are preprocessed with the evaluated encoder's own open_clip evaluation
transform (resize, centre crop, RGB, normalise). Per task: top-1 accuracy over all samples and
cross-entropy averaged over samples; the average is the unweighted mean over tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from fusion_bench.data.loading import (
    ImageClassificationCollate,
    check_image_classification_columns,
    load_dataset_from_config,
)
from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.models.openclip_checkpoints import load_classification_head
from fusion_bench.models.openclip_vision import ImageEncoder, TransformImageProcessor
from fusion_bench.taskpool.base_pool import register_taskpool
from fusion_bench.taskpool.classification import (
    ClassificationTaskPool,
    check_num_classes,
    evaluate_classifier,
    fast_dev_run_limit,
    sharded_test_loader,
)
from fusion_bench.taskpool.task_groups import mean_over_tasks
from fusion_bench.utils.instantiate import to_container

__all__ = ["OpenCLIPVisionModelTaskPool", "OpenCLIPImageClassifier"]


class OpenCLIPImageClassifier(nn.Module):
    """``head(encoder(images))``: (B, 3, H, W) -> (B, C)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.image_encoder = encoder
        self.classification_head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.image_encoder(images))


@register_taskpool("OpenCLIPVisionModelTaskPool")
class OpenCLIPVisionModelTaskPool(ClassificationTaskPool):
    """Evaluate an OpenCLIP :class:`~fusion_bench.models.openclip_vision.ImageEncoder` with given heads.

    Args:
        test_datasets: ``{task: dataset entry}`` (hub id, ``save_to_disk`` folder, ``{path, split}``, ``_target_``).
        classification_heads: ``{task: head entry}`` (path, ``{path, normalize}``, ``_target_``); every
            test task needs one.
        model_dir: the folder relative head paths start from (None: the working directory).
        allow_pickle: allow unpickling task_vectors' ``head_<Task>.pt`` (runs code from the files).
        dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (batch_size, num_workers...).
        fast_dev_run: ``True`` evaluates one batch per task, an int that many; reports say so.
    """

    def __init__(
        self,
        test_datasets: Mapping[str, Any],
        classification_heads: Mapping[str, Any],
        *,
        model_dir: str | None = None,
        allow_pickle: bool = False,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        fast_dev_run: bool | int = False,
    ) -> None:
        self._dataset_cfgs = dict(to_container(test_datasets) or {})
        self._head_cfgs = dict(to_container(classification_heads) or {})
        if not self._dataset_cfgs:
            raise ConfigError("taskpool: 'test_datasets' must be a non-empty mapping of task -> dataset")
        missing = [t for t in self._dataset_cfgs if t not in self._head_cfgs]
        if missing:
            raise ConfigError(
                f"taskpool: no classification head for test task(s) {missing}; heads are given for {list(self._head_cfgs)}"
            )
        self.model_dir = str(Path(model_dir).expanduser()) if model_dir else None
        self.allow_pickle = bool(allow_pickle)
        self.dataloader_kwargs = dict(to_container(dataloader_kwargs) or {})
        self.dataloader_kwargs.pop("shuffle", None)
        self.fast_dev_run = fast_dev_run
        self._is_setup = False
        self._num_samples: dict[str, int] = {}

    def setup(self) -> None:
        """Load the heads and the test datasets, checking each head's class count against its dataset."""
        if self._is_setup:
            return
        self.classification_heads = {
            task: load_classification_head(
                self._head_cfgs[task],
                what=f"classification head {task!r}",
                allow_pickle=self.allow_pickle,
                base_dir=self.model_dir,
            )
            for task in self.task_names
        }
        self.test_datasets = {}
        for task in self.task_names:
            what = f"test dataset {task!r}"
            dataset = load_dataset_from_config(self._dataset_cfgs[task], split="test", what=what)
            check_image_classification_columns(dataset, what=what)
            rows = int(self.classification_heads[task].weight.shape[0])
            check_num_classes(dataset, rows, what=what, against="rows in its classification head")
            self.test_datasets[task] = dataset
        self._is_setup = True

    def get_dataloader(self, task: str, transform: Any, *, limit: int | None = None) -> DataLoader:
        """The test loader of ``task``: the first ``limit`` samples (None: all), in order, this rank's shard only."""
        kwargs = {"batch_size": 128, **self.dataloader_kwargs}
        collate = ImageClassificationCollate(TransformImageProcessor(transform))
        return sharded_test_loader(self.test_datasets[task], collate, kwargs, fabric=self.fabric, limit=limit)

    def _check_model(self, model: nn.Module) -> None:
        if not isinstance(model, ImageEncoder):
            raise ModelLoadError(f"the model to evaluate is a {type(model).__name__}, not an OpenCLIP ImageEncoder")
        for task, head in self.classification_heads.items():
            if head.weight.shape[1] != model.architecture.embed_dim:
                raise ModelLoadError(
                    f"classification head {task!r} takes {head.weight.shape[1]} features but the model's "
                    f"embedding has {model.architecture.embed_dim}"
                )

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Evaluate ``model`` on every task.

        Returns:
            ``{task: {"accuracy", "loss"}, ..., "average": {...}}``.
        """
        self.setup()
        self._check_model(model)
        device = self.fabric.device if self.fabric is not None else next(model.parameters()).device
        model = model.to(device).eval()
        dtype = next(model.parameters()).dtype
        limit = fast_dev_run_limit(self.fast_dev_run, int({"batch_size": 128, **self.dataloader_kwargs}["batch_size"]))
        transform = model.val_preprocess
        report: dict[str, Any] = {}
        for task in self.task_names:
            classifier = OpenCLIPImageClassifier(model, self.classification_heads[task].to(device=device, dtype=dtype))
            report[task], self._num_samples[task] = evaluate_classifier(
                classifier,
                self.get_dataloader(task, transform, limit=limit),
                device=device,
                dtype=dtype,
                fabric=self.fabric,
                desc=f"eval {task}",
                what=f"test dataset {task!r}",
            )
        report["average"] = mean_over_tasks(report, self.task_names)
        return report
