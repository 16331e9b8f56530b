"""``ResNetProcessor``: ResNets (``ResNetForImageClassification``, hub default ``microsoft/resnet-50``).

He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016. https://arxiv.org/abs/1512.03385

ResNets end in adaptive average pooling, so they take any input size: images are resized by
the checkpoint's image processor (a ``ConvNextImageProcessor`` on the hub: shortest edge to
``image_size / crop_pct``, centre crop to ``image_size``). The head is
``classifier = Sequential(Flatten(), Linear(hidden_sizes[-1], num_classes))``.

ResNets hold BatchNorm running statistics; see :mod:`fusion_bench.models.batchnorm` for why
merged ResNets recompute them instead of averaging.
"""

from __future__ import annotations

from torch import nn

from fusion_bench.tasks.classification.processor import ClassificationProcessor

__all__ = ["ResNetProcessor"]


class ResNetProcessor(ClassificationProcessor):
    """Processor of ResNet classifiers (see module docstring)."""

    model_type = "resnet"
    model_class_name = "ResNetForImageClassification"
    head_prefix = "classifier."

    @classmethod
    def new_head(cls, model: nn.Module, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(model.config.hidden_sizes[-1], num_classes))
