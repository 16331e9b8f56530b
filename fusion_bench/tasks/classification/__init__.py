"""The Lightning image-classification framework (ViT, ResNet): the training that produces
the fine-tuned classifiers FusionBench merges.

Names (as in the FusionBench documentation): :class:`BaseConfig`
(``fusion_bench.tasks.common.base_module``), :class:`ClassificationProcessor`,
:class:`ViTProcessor`, :class:`ResNetProcessor`, :class:`ClassificationMetricLogger`,
:class:`ClassificationModule` and the :class:`ImageClassificationDataModule`;
:func:`build_callbacks` gives the checkpointing / early-stopping / learning-rate callbacks.
"""

from fusion_bench.tasks.classification.callbacks import best_checkpoint, build_callbacks
from fusion_bench.tasks.classification.classification_metric_logger import (
    ClassificationMetricLogger,
    plot_confusion_matrix,
)
from fusion_bench.tasks.classification.datamodule import ImageClassificationDataModule, label_info, load_splits
from fusion_bench.tasks.classification.lightning_module import ClassificationModule, build_lr_scheduler, build_optimizer
from fusion_bench.tasks.classification.processor import (
    PROCESSORS,
    ClassificationProcessor,
    load_hf_config,
    load_image_processor,
    processor_class_for,
)
from fusion_bench.tasks.classification.resnet_processor import ResNetProcessor
from fusion_bench.tasks.classification.vit_processor import ViTProcessor
from fusion_bench.tasks.common.base_module import BaseConfig

__all__ = [
    "BaseConfig",
    "ClassificationProcessor",
    "ViTProcessor",
    "ResNetProcessor",
    "PROCESSORS",
    "processor_class_for",
    "load_hf_config",
    "load_image_processor",
    "ClassificationMetricLogger",
    "plot_confusion_matrix",
    "ClassificationModule",
    "build_optimizer",
    "build_lr_scheduler",
    "ImageClassificationDataModule",
    "load_splits",
    "label_info",
    "build_callbacks",
    "best_checkpoint",
]
