"""Zero-shot evaluation of CLIP vision encoders on image classification tasks.

The text tower, ``visual_projection`` and ``logit_scale`` come from the task pool's own
CLIP model (``clip_model``); the evaluated vision encoder replaces its vision tower. Per
task: top-1 accuracy over all samples and cross-entropy averaged over *samples* (the
reference implementation averaged batch means; the two differ when the last batch is
short). The average is the unweighted mean over tasks; ``task_groups`` adds the mean over each
named group of tasks (e.g. ``seen`` / ``unseen``, :mod:`fusion_bench.taskpool.task_groups`).
Dataset entries may ask for corrupted images (:mod:`fusion_bench.data.corruptions`); the
report's ``meta.corruption`` then says which corruption, severity and seed each task used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from fusion_bench.data.loading import (
    ImageClassificationCollate,
    check_image_classification_columns,
    load_dataset_from_config,
    split_corruption_options,
)
from fusion_bench.data.task_text import task_classnames_and_templates
from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.models.hf_clip import is_clip_vision_model, load_clip_model, load_clip_processor
from fusion_bench.models.zero_shot import CLIPZeroShotClassifier, cached_zero_shot_classifier, text_tower_fingerprint
from fusion_bench.taskpool.base_pool import BaseTaskPool, register_taskpool
from fusion_bench.taskpool.classification import (
    check_num_classes,
    evaluate_classifier,
    fast_dev_run_limit,
    sharded_test_loader,
)
from fusion_bench.taskpool.clip_vision.features import LayerWiseFeatureSaver
from fusion_bench.taskpool.task_groups import add_group_averages, check_task_groups, mean_over_tasks
from fusion_bench.utils.distributed import world_size
from fusion_bench.utils.paths import cache_root
from fusion_bench.utils.instantiate import to_container
from fusion_bench.utils.progress import progress

__all__ = ["CLIPVisionModelTaskPool", "default_head_cache_dir", "LOSS_REDUCTION"]

log = logging.getLogger(__name__)

LOSS_REDUCTION = "cross-entropy averaged over samples"


def default_head_cache_dir() -> str:
    """``$FUSION_BENCH_CACHE_DIR/zeroshot_heads`` (default ``~/.cache/fusion_bench``)."""
    return str(cache_root() / "zeroshot_heads")


@register_taskpool("clip_vit_classification", "CLIPVisionModelTaskPool")
class CLIPVisionModelTaskPool(BaseTaskPool):
    """Evaluate a CLIP vision encoder on image classification tasks (zero-shot heads).

    Args:
        test_datasets: ``{task: dataset entry}``; an entry may add ``classnames`` and
            ``templates`` for tasks other than the eight CLIP tasks and the mini benchmark's.
        clip_model: the base CLIP model giving the text tower, projection and logit scale
            (path, ``{pretrained_model_name_or_path}`` or ``_target_`` config).
        processor: the ``CLIPProcessor`` for the text side (defaults to ``clip_model``'s path).
        data_processor: the processor for images (defaults to ``processor``).
        dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (batch_size, num_workers...).
        layer_wise_feature_save_path: if set, save each encoder layer's output per task there.
        layer_wise_feature_first_token_only: save only the class token's features.
        layer_wise_feature_max_num: save at most this many samples per task (None: all).
        fast_dev_run: ``True`` evaluates one batch per task, an int that many; reports say so.
        head_cache_dir: where zero-shot heads are cached by content hash (None: no cache).
        task_groups: ``{group: [task, ...]}``; the report adds each group's mean metrics
            (e.g. ``{seen: [...], unseen: [...]}`` for generalization experiments).
    """

    def __init__(
        self,
        test_datasets: Mapping[str, Any],
        *,
        clip_model: Any,
        processor: Any = None,
        data_processor: Any = None,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        layer_wise_feature_save_path: str | None = None,
        layer_wise_feature_first_token_only: bool = True,
        layer_wise_feature_max_num: int | None = None,
        fast_dev_run: bool | int = False,
        head_cache_dir: str | None = "default",
        task_groups: Mapping[str, list[str]] | None = None,
    ) -> None:
        entries = to_container(test_datasets)
        if not isinstance(entries, Mapping) or not entries:
            raise ConfigError(
                f"taskpool: 'test_datasets' must be a non-empty mapping of task -> dataset, got {entries!r}"
            )
        self._dataset_cfgs: dict[str, Any] = {}
        self._task_text: dict[str, tuple[list[str], list[str]]] = {}
        self._corruptions: dict[str, dict[str, Any]] = {}
        for task, entry in entries.items():
            self._dataset_cfgs[task], self._task_text[task] = self._split_entry(str(task), entry)
            _, corruption = split_corruption_options(self._dataset_cfgs[task], what=f"test dataset {task!r}")
            if corruption is not None:
                self._corruptions[str(task)] = corruption.describe()
        self.task_groups = check_task_groups(task_groups, list(self._dataset_cfgs))
        self._clip_model_cfg = to_container(clip_model)
        self._processor_cfg = to_container(processor) if processor is not None else self._clip_model_cfg
        self._data_processor_cfg = to_container(data_processor) if data_processor is not None else self._processor_cfg
        self.dataloader_kwargs = dict(to_container(dataloader_kwargs) or {})
        self.dataloader_kwargs.pop("shuffle", None)
        self.layer_wise_feature_save_path = layer_wise_feature_save_path
        self.layer_wise_feature_first_token_only = layer_wise_feature_first_token_only
        self.layer_wise_feature_max_num = layer_wise_feature_max_num
        self.fast_dev_run = fast_dev_run
        self.head_cache_dir = default_head_cache_dir() if head_cache_dir == "default" else head_cache_dir
        self._is_setup = False
        self._feature_saver: LayerWiseFeatureSaver | None = None

    @staticmethod
    def _split_entry(task: str, entry: Any) -> tuple[Any, tuple[list[str], list[str]]]:
        """Separate ``classnames``/``templates`` from the dataset entry (or look them up)."""
        classnames = templates = None
        if isinstance(entry, Mapping) and ("classnames" in entry or "templates" in entry):
            entry = dict(entry)
            classnames, templates = entry.pop("classnames", None), entry.pop("templates", None)
        text = task_classnames_and_templates(task, classnames, templates, what=f"test dataset {task!r}")
        return entry, text

    @property
    def task_names(self) -> list[str]:
        return list(self._dataset_cfgs)

    # ---- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the CLIP model, processors and test datasets, checking labels against class names."""
        if self._is_setup:
            return
        self.clip_model = load_clip_model(self._clip_model_cfg).eval().requires_grad_(False)
        self.processor = load_clip_processor(self._processor_cfg, what="taskpool processor")
        self.data_processor = load_clip_processor(self._data_processor_cfg, what="taskpool data_processor")
        self.test_datasets = {
            task: self._load_dataset(task) for task in progress(list(self._dataset_cfgs), desc="test data")
        }
        self._fingerprint = text_tower_fingerprint(self.clip_model) if self.head_cache_dir else None
        self._is_setup = True

    def _load_dataset(self, task: str) -> Any:
        what = f"test dataset {task!r}"
        dataset = load_dataset_from_config(self._dataset_cfgs[task], split="test", what=what)
        check_image_classification_columns(dataset, what=what)
        check_num_classes(dataset, len(self._task_text[task][0]), what=what, against="class names")
        return dataset

    def _tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _image_processor(self) -> Any:
        return getattr(self.data_processor, "image_processor", self.data_processor)

    def classifier_head(self, task: str) -> torch.Tensor:
        """The (C, D) zero-shot head of ``task`` (cached on disk by content hash)."""
        self.setup()
        classnames, templates = self._task_text[task]
        return cached_zero_shot_classifier(
            self.clip_model,
            self._tokenizer(),
            classnames,
            templates,
            cache_dir=self.head_cache_dir,
            fingerprint=self._fingerprint,
        )

    def get_classifier(self, model: nn.Module, task: str) -> CLIPZeroShotClassifier:
        """``model`` with the projection, logit scale and head of ``task``."""
        return CLIPZeroShotClassifier(
            model, self.clip_model.visual_projection, self.clip_model.logit_scale, self.classifier_head(task)
        )

    def get_dataloader(self, task: str, *, limit: int | None = None) -> DataLoader:
        """The test loader of ``task``: in order, this rank's shard only (see :func:`~fusion_bench.taskpool.classification.sharded_test_loader`).

        Args:
            task: the task name.
            limit: use only the first ``limit`` samples (None: all), before sharding.
        """
        self.setup()
        kwargs = {"batch_size": 128, **self.dataloader_kwargs}
        collate = ImageClassificationCollate(self._image_processor())
        return sharded_test_loader(self.test_datasets[task], collate, kwargs, fabric=self.fabric, limit=limit)

    # ---- hooks ------------------------------------------------------------------------------
    def on_task_evaluation_begin(self, classifier: CLIPZeroShotClassifier, task_name: str) -> None:
        """Called before a task's evaluation; registers the layer-wise feature hooks if asked."""
        if self.layer_wise_feature_save_path is not None:
            self._feature_saver = LayerWiseFeatureSaver(
                classifier.vision_model,
                Path(self.layer_wise_feature_save_path) / f"{task_name}.safetensors",
                first_token_only=self.layer_wise_feature_first_token_only,
                max_num=self.layer_wise_feature_max_num,
            )

    def on_task_evaluation_end(self) -> None:
        """Called after a task's evaluation; saves and removes the feature hooks."""
        if self._feature_saver is not None:
            self._feature_saver.save_and_remove()
            self._feature_saver = None

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Evaluate ``model`` (a CLIP vision encoder) on every task.

        Returns:
            ``{task: {"accuracy", "loss"}, ..., "average": {...}, group: {...}, ...}`` (one
            entry per task group, after the average).
        """
        conditioned = callable(getattr(model, "for_task", None)) and getattr(model, "task_names", None) is not None
        if conditioned:  # a task-specific encoder per task (the task known at inference): model.for_task(task)
            missing = [t for t in self.task_names if t not in model.task_names]
            if missing:
                raise ConfigError(
                    f"taskpool: the model needs the task at inference and has no model for task(s) "
                    f"{', '.join(map(repr, missing))} (it knows {', '.join(map(repr, model.task_names))})"
                )
        elif not is_clip_vision_model(model):
            raise ModelLoadError(f"the model to evaluate is a {type(model).__name__}, not a CLIP vision model")
        if self.layer_wise_feature_save_path is not None and world_size(self.fabric) > 1:
            raise ConfigError(
                f"taskpool: layer_wise_feature_save_path={self.layer_wise_feature_save_path!r} saves features on one "
                f"device; run it with fabric.devices=1 (got {world_size(self.fabric)} processes)"
            )
        self.setup()
        device = self.fabric.device if self.fabric is not None else next(model.parameters()).device
        model = model.to(device).eval()
        self.clip_model.to(device)
        report: dict[str, Any] = {}
        for task in progress(self.task_names, desc="evaluating", leave=True):
            encoder = model.for_task(task).to(device).eval() if conditioned else model
            classifier = self.get_classifier(encoder, task).to(device)
            self.on_task_evaluation_begin(classifier, task)
            try:
                report[task] = self._evaluate_task(classifier, task, device)
            finally:
                self.on_task_evaluation_end()
        report["average"] = mean_over_tasks(report, self.task_names)
        return add_group_averages(report, self.task_groups)

    def _evaluate_task(self, classifier: CLIPZeroShotClassifier, task: str, device: torch.device) -> dict[str, float]:
        """Accuracy and mean loss over the task's samples; each rank evaluates its shard and the
        ranks' counts and float64 loss sums are added, so any number of devices gives one device's numbers."""
        batch_size = int(self.dataloader_kwargs.get("batch_size", 128))
        limit = fast_dev_run_limit(self.fast_dev_run, batch_size)
        dtype = next(classifier.vision_model.parameters()).dtype
        metrics, count = evaluate_classifier(
            classifier,
            self.get_dataloader(task, limit=limit),
            device=device,
            dtype=dtype,
            fabric=self.fabric,
            desc=f"eval {task}",
            what=f"test dataset {task!r}",
        )
        self._num_samples = {**getattr(self, "_num_samples", {}), task: count}
        return metrics

    def evaluation_meta(self) -> dict[str, Any]:
        """What a reader needs to interpret the numbers (samples per task, loss reduction, partial runs)."""
        meta = {
            "loss_reduction": LOSS_REDUCTION,
            "num_samples": dict(getattr(self, "_num_samples", {})),
            "fast_dev_run": bool(self.fast_dev_run),
            "world_size": world_size(self.fabric),
        }
        if self.task_groups:
            meta["task_groups"] = {name: list(tasks) for name, tasks in self.task_groups.items()}
        if self._corruptions:
            meta["corruption"] = dict(self._corruptions)
        return meta
