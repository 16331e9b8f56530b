"""``ViTProcessor``: Vision Transformers (``ViTForImageClassification``, hub default
``google/vit-base-patch16-224``).

Dosovitskiy et al., *An Image is Worth 16x16 Words*, ICLR 2021. https://arxiv.org/abs/2010.11929

A ViT's position embeddings fix its input size (``config.image_size``): ``image_size`` must
equal it (or be left null) and be a multiple of ``patch_size``; anything else is a
:class:`~fusion_bench.errors.ConfigError` when the model is loaded, not a shape error deep
inside the forward pass. The head is ``classifier = Linear(hidden_size, num_classes)`` on the
final layer-normed class token.
"""

from __future__ import annotations

from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.tasks.classification.processor import ClassificationProcessor

__all__ = ["ViTProcessor"]


class ViTProcessor(ClassificationProcessor):
    """Processor of ViT classifiers (see module docstring)."""

    model_type = "vit"
    model_class_name = "ViTForImageClassification"
    head_prefix = "classifier."

    @classmethod
    def new_head(cls, model: nn.Module, num_classes: int) -> nn.Module:
        return nn.Linear(model.config.hidden_size, num_classes)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        size, patch = int(model.config.image_size), int(model.config.patch_size)
        height, width = self.output_size()
        if (height, width) != (size, size):
            raise ConfigError(
                f"ViTProcessor: the ViT takes {size}x{size} images (its config.image_size; position embeddings "
                f"are fixed) but image_size={self.config.image_size!r} gives {height}x{width}; "
                f"set image_size to {size} or null"
            )
        if size % patch:
            raise ConfigError(f"ViTProcessor: image size {size} is not a multiple of the patch size {patch}")
