"""``image_classification_finetune``: fine-tune a ViT or ResNet classifier on one task (Lightning).

Trains the pool's ``_pretrained_`` image classifier (an ``HFImageClassificationModelPool``)
on the pool's train dataset ``task`` with the framework of :mod:`fusion_bench.tasks.classification`:
its head is replaced by one of the task's class count, then the whole model is trained by a
``lightning.Trainer`` (optimiser, schedule, augmentation, early stopping and checkpointing
from ``config``, a :class:`~fusion_bench.tasks.common.base_module.BaseConfig`). The result is
saved (``save_path``) as a Hugging Face folder with its image processor, which any
``HFImageClassificationModelPool`` loads, so experts trained here are merged like the CLIP ones.

Kolesnikov et al., *Big Transfer (BiT): General Visual Representation Learning*, ECCV 2020,
https://arxiv.org/abs/1912.11370 (fine-tuning pre-trained classifiers with a new head).

The program's ``lightning.Fabric`` chooses the device (its accelerator and device index are
given to the Trainer). With a ``checkpoint_dir`` the best checkpoint by ``monitor`` is the
one returned and saved, else the last weights. The pool's test split of ``task``, if any, is
evaluated at the end (``extra_report``).
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelPoolError
from fusion_bench.method._options import check_int
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.tasks.classification import (
    ClassificationModule,
    ImageClassificationDataModule,
    best_checkpoint,
    build_callbacks,
    label_info,
)
from fusion_bench.tasks.classification.classification_metric_logger import SCALAR_METRICS
from fusion_bench.tasks.common.base_module import BaseConfig, config_from_mapping
from fusion_bench.utils.instantiate import to_container

__all__ = ["ImageClassificationFinetuneAlgorithm"]

NAME = "image_classification_finetune"


@register_algorithm(NAME)
class ImageClassificationFinetuneAlgorithm(BaseAlgorithm):
    """Fine-tune the pool's ``_pretrained_`` ViT/ResNet on one train dataset (see module docstring).

    Args:
        task: the pool's train dataset (None: the pool's only one).
        config: :class:`BaseConfig` fields (learning_rate, batch_size, scheduler, augmentation,
            early stopping, checkpointing...); ``model_name`` comes from the pool, ``num_classes``
            and ``class_names`` default to the dataset's.
        max_epochs: training epochs (-1: until ``max_steps``).
        max_steps: optimiser steps (-1: until ``max_epochs``).
        save_path: folder for the fine-tuned model + image processor (atomic); None: not saved.
        log_dir: Lightning's root dir (CSV logs, confusion-matrix figures); None: a temporary one.
    """

    def __init__(
        self,
        *,
        task: str | None = None,
        config: Mapping[str, Any] | None = None,
        max_epochs: int = 10,
        max_steps: int = -1,
        save_path: str | None = None,
        log_dir: str | None = None,
    ) -> None:
        self.task = task
        self.config = dict(to_container(config) or {})
        config_from_mapping(self.config, what=f"{NAME}: config", model_name="(from the pool)")  # check early
        self.max_epochs = check_int(NAME, "max_epochs", max_epochs, low=-1)
        self.max_steps = check_int(NAME, "max_steps", max_steps, low=-1)
        if self.max_epochs in (-1, 0) and self.max_steps in (-1, 0):
            raise ConfigError(
                f"{NAME}: set max_epochs or max_steps to a positive number; got {max_epochs!r}, {max_steps!r}"
            )
        self.save_path, self.log_dir = save_path or None, log_dir or None
        self.summary: dict[str, Any] = {}

    def _task(self, modelpool: BaseModelPool) -> str:
        names = modelpool.train_dataset_names
        if self.task is None and len(names) == 1:
            return names[0]
        if self.task not in names:
            what = "choose one with method.task" if self.task is None else f"task {self.task!r} is not among them"
            raise ConfigError(f"{NAME}: the pool's train datasets are {names}; {what}")
        return str(self.task)

    def _splits(self, modelpool: BaseModelPool, task: str) -> dict[str, Any]:
        splits = {"train": modelpool.load_train_dataset(task)}
        if task in modelpool.val_dataset_names:
            splits["validation"] = modelpool.load_val_dataset(task)
        if task in modelpool.test_dataset_names:
            splits["test"] = modelpool.load_test_dataset(task)
        return splits

    def _run_config(self, modelpool: BaseModelPool, train: Any) -> BaseConfig:
        entry = modelpool.get_model_config(PRETRAINED)
        model_name = (
            str(entry.get("pretrained_model_name_or_path", PRETRAINED)) if isinstance(entry, Mapping) else PRETRAINED
        )
        num_classes, names = label_info(train, what=f"{NAME}: train dataset")
        given = {k: v for k, v in self.config.items() if not (k in ("num_classes", "class_names") and v is None)}
        dataset_labels = {} if "num_classes" in given else {"num_classes": num_classes, "class_names": names}
        options = {**dataset_labels, **given}  # null / absent: the dataset's
        return config_from_mapping(options, what=f"{NAME}: config", model_name=model_name)

    def _trainer(self, config: BaseConfig, root: str, callbacks: list) -> Any:
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        device = self.fabric.device if self.fabric is not None else torch.device("cpu")
        accelerator, devices = ("gpu", [device.index or 0]) if device.type == "cuda" else ("cpu", 1)
        return L.Trainer(
            accelerator=accelerator,
            devices=devices,
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            callbacks=callbacks,
            logger=CSVLogger(root, name=NAME) if self.log_dir else False,
            enable_checkpointing=config.checkpoint_dir is not None,
            default_root_dir=root,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
        )

    @staticmethod
    def _check_monitor(config: BaseConfig, datamodule: ImageClassificationDataModule) -> None:
        followers = [
            n
            for n, on in (
                ("early_stopping_patience", config.early_stopping_patience is not None),
                ("checkpoint_dir", config.checkpoint_dir is not None),
                ("scheduler 'plateau'", config.scheduler == "plateau"),
            )
            if on
        ]
        if followers and config.monitor.startswith("val/") and not datamodule.has_split("val"):
            raise ConfigError(
                f"{NAME}: {', '.join(followers)} follow {config.monitor!r} but there is no validation data; "
                f"give the pool a val dataset or set config.val_fraction > 0"
            )

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Fine-tune, save if ``save_path`` is set, and return the fine-tuned classifier."""
        if not hasattr(modelpool, "processor_class"):
            raise ModelPoolError(f"{NAME} needs an HFImageClassificationModelPool; got {type(modelpool).__name__}")
        task = self._task(modelpool)
        splits = self._splits(modelpool, task)
        config = self._run_config(modelpool, splits["train"])
        processor = modelpool.processor_class(PRETRAINED)(config, image_processor=modelpool.load_processor())
        datamodule = ImageClassificationDataModule(splits, processor=processor, config=config)
        datamodule.setup("fit")
        self._check_monitor(config, datamodule)
        module = ClassificationModule(model_ckpt=modelpool.load_pretrained_model(), config=config, processor=processor)
        callbacks = build_callbacks(config, learning_rate_monitor=self.log_dir is not None)
        with tempfile.TemporaryDirectory(prefix="fusion_bench-finetune-") as scratch:
            trainer = self._trainer(config, self.log_dir or scratch, callbacks)
            trainer.fit(module, datamodule)
            best = best_checkpoint(callbacks)
            if best:
                module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
            tested = trainer.test(module, datamodule, verbose=False) if datamodule.has_split("test") else []
        self._summarise(task, trainer, module, best, tested)
        if self.save_path is not None:
            module.save_pretrained(self.save_path, description=self._model_card(task, config))
        return module.model.cpu().eval()

    def _summarise(self, task: str, trainer: Any, module: ClassificationModule, best: str | None, tested: list) -> None:
        history = module.metric_logger.history
        last = {s: {k: history[s][-1][k] for k in SCALAR_METRICS} for s in ("train", "val") if history[s]}
        self.summary = {
            "task": task,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "best_checkpoint": best,
            **last,
        }
        if tested:
            self.summary["test"] = {k.split("/", 1)[1]: float(v) for k, v in tested[0].items() if k.startswith("test/")}

    def _model_card(self, task: str, config: BaseConfig) -> str:
        return (
            f"# Image classifier fine-tuned on {task!r}\n\nMade with FusionBench `{NAME}` "
            f"(max_epochs={self.max_epochs}, max_steps={self.max_steps}).\n\nConfig: {config.to_dict()}\n"
            f"\nResult: {self.summary}\n"
        )

    def extra_report(self) -> dict[str, Any]:
        """Task, epochs, steps, last train/val metrics and the test metrics of the returned model."""
        return {NAME: self.summary} if self.summary else {}
