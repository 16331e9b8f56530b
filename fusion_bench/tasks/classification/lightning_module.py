"""``ClassificationModule``: fine-tune a Hugging Face image classifier (ViT, ResNet) with Lightning.

    config = BaseConfig(model_name="google/vit-base-patch16-224", num_classes=10, learning_rate=1e-4)
    processor = ViTProcessor(config)
    module = ClassificationModule(model_ckpt=config.model_name, config=config, processor=processor,
                                  metric_logger=ClassificationMetricLogger(config))
    datamodule = ImageClassificationDataModule("tanganke/eurosat", processor=processor)
    lightning.Trainer(max_epochs=10, callbacks=build_callbacks(config)).fit(module, datamodule)
    module.save_pretrained("outputs/vit_eurosat")   # a folder any ViT model pool loads

Loss: cross-entropy (``label_smoothing`` in training only), logged per step and as the
sample-weighted epoch mean ``<stage>/loss``; the other metrics come from the
:class:`ClassificationMetricLogger`. Optimiser and learning-rate schedule from the config
(:func:`build_optimizer`, :func:`build_lr_scheduler`); early stopping and checkpointing are
Lightning callbacks (:mod:`fusion_bench.tasks.classification.callbacks`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.errors import ConfigError, DatasetError
from fusion_bench.tasks.classification.classification_metric_logger import ClassificationMetricLogger
from fusion_bench.tasks.classification.processor import ClassificationProcessor, load_hf_config, processor_class_for
from fusion_bench.tasks.common.base_module import BaseConfig
from fusion_bench.utils.io import atomic_directory

__all__ = ["ClassificationModule", "build_optimizer", "build_lr_scheduler", "WarmupDecay"]


def build_optimizer(config: BaseConfig, params: Any) -> torch.optim.Optimizer:
    """The config's optimiser over ``params`` (SGD with momentum 0.9)."""
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


class WarmupDecay:
    """Learning-rate factor at step ``s``: linear warm-up ``s / warmup`` then ``kind`` decay.

    ``cosine``: ``0.5 (1 + cos(π p))``, ``linear``: ``1 − p``, ``constant``: 1, with
    ``p = (s − warmup) / (total − warmup)``. A plain object, so its state saves in checkpoints.
    """

    def __init__(self, kind: str, *, warmup_steps: int, total_steps: int) -> None:
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress


def build_lr_scheduler(config: BaseConfig, optimizer: torch.optim.Optimizer, *, total_steps: float) -> dict[str, Any]:
    """The ``lr_scheduler`` entry of ``configure_optimizers`` for the config's schedule.

    Args:
        config: ``scheduler``, ``warmup_steps``, ``monitor``, ``monitor_mode``.
        optimizer: the optimiser.
        total_steps: optimiser steps of the whole run (the trainer's ``estimated_stepping_batches``).
    """
    if config.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=config.monitor_mode, factor=0.1, patience=1
        )
        return {"scheduler": scheduler, "monitor": config.monitor, "interval": "epoch"}
    if config.scheduler in ("cosine", "linear") and not math.isfinite(total_steps):
        raise ConfigError(
            f"scheduler {config.scheduler!r} decays over the whole run: give the Trainer max_epochs or max_steps"
        )
    total = int(total_steps) if math.isfinite(total_steps) else 0
    factor = WarmupDecay(config.scheduler, warmup_steps=config.warmup_steps, total_steps=total)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def _processor_for(model_ckpt: Any, config: BaseConfig) -> ClassificationProcessor:
    if isinstance(model_ckpt, nn.Module):
        model_type = getattr(getattr(model_ckpt, "config", None), "model_type", None)
    else:
        model_type = getattr(load_hf_config(model_ckpt, what=f"model {str(model_ckpt)!r}"), "model_type", None)
    return processor_class_for(str(model_type))(config)


class ClassificationModule(L.LightningModule):
    """A Hugging Face image classifier as a ``LightningModule`` (see module docstring).

    Args:
        model_ckpt: hub id, local folder or loaded model (None: ``config.model_name``).
        config: the run's :class:`BaseConfig` (or its fields as a mapping; None: defaults with
            ``model_name = model_ckpt``).
        processor: the model family's processor (None: chosen by the checkpoint's ``model_type``).
        metric_logger: the metrics (None: a :class:`ClassificationMetricLogger` for the model's classes).
    """

    def __init__(
        self,
        model_ckpt: str | Path | nn.Module | None = None,
        config: BaseConfig | Mapping[str, Any] | None = None,
        processor: ClassificationProcessor | None = None,
        metric_logger: ClassificationMetricLogger | None = None,
    ) -> None:
        super().__init__()
        if isinstance(config, Mapping):
            config = BaseConfig(**config)
        if config is None:
            config = BaseConfig(model_name=str(model_ckpt)) if isinstance(model_ckpt, (str, Path)) else BaseConfig()
        model_ckpt = config.model_name if model_ckpt is None else model_ckpt
        self.config = config
        self.processor = processor if processor is not None else _processor_for(model_ckpt, config)
        self.model = self.processor.load_model(
            model_ckpt
        ).train()  # from_pretrained gives eval mode; BatchNorm must train
        self.num_classes = int(self.model.config.num_labels)
        if metric_logger is None:
            names = config.class_names if config.class_names and len(config.class_names) == self.num_classes else None
            metric_logger = ClassificationMetricLogger(config.replace(num_classes=self.num_classes, class_names=names))
        if metric_logger.num_classes != self.num_classes:
            raise ConfigError(
                f"ClassificationModule: the metric logger counts {metric_logger.num_classes} classes "
                f"but the model's head has {self.num_classes}"
            )
        self.metric_logger = metric_logger
        ckpt = str(model_ckpt) if isinstance(model_ckpt, (str, Path)) else config.model_name
        self.save_hyperparameters({"model_ckpt": ckpt, "config": config.to_dict()})

    # ---- forward and steps ----------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixel values -> (B, C) logits."""
        return self.model(pixel_values=pixel_values).logits

    def on_fit_start(self) -> None:
        self.train()  # Lightning keeps modules' modes; a model left in eval mode would not train its BatchNorm

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "setup") and hasattr(datamodule, "num_classes"):
            datamodule.setup(stage)
            if datamodule.num_classes is not None and datamodule.num_classes > self.num_classes:
                raise DatasetError(
                    f"the dataset has {datamodule.num_classes} classes but the model's head has "
                    f"{self.num_classes}; set num_classes={datamodule.num_classes}"
                )

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        pixel_values, labels = batch
        if labels.numel() and (int(labels.max()) >= self.num_classes or int(labels.min()) < 0):
            bad = int(labels.max()) if int(labels.max()) >= self.num_classes else int(labels.min())
            raise DatasetError(f"{stage} batch: label {bad} is out of range for the model's {self.num_classes} classes")
        logits = self(pixel_values)
        smoothing = self.config.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=stage != "test",
            batch_size=labels.numel(),
            sync_dist=True,
        )
        self.metric_logger.update(stage, logits.detach(), labels)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pixel_values = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(pixel_values).argmax(dim=-1)

    # ---- epoch ends: metrics ------------------------------------------------------------------
    def _log_metrics(self, stage: str) -> None:
        root = self.trainer.log_dir or self.trainer.default_root_dir
        self.metric_logger.log_epoch(self, stage, epoch=self.current_epoch, figure_dir=Path(root) / "confusion_matrix")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the sanity check's batches are not an epoch
            self.metric_logger.reset("val")
            return
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.config, [p for p in self.model.parameters() if p.requires_grad])
        scheduler = build_lr_scheduler(self.config, optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, *, description: str = "") -> Path:
        """Save the model and its image processor to the folder ``path`` atomically (with a model card).

        The folder loads with ``<Family>ForImageClassification.from_pretrained`` and in an
        ``HFImageClassificationModelPool``.
        """
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            card = (
                description
                or f"# {type(self.model).__name__} fine-tuned with FusionBench\n\nConfig: {self.config.to_dict()}\n"
            )
            (tmp / "README.md").write_text(card)
        return Path(path)
