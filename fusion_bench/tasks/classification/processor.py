"""``ClassificationProcessor``: images -> model inputs, and the model family's head surgery.

A processor wraps the model's *own* Hugging Face image processor (resize, crop, rescale,
normalise exactly as the checkpoint expects), adds the training augmentations of the
:class:`~fusion_bench.tasks.common.base_module.BaseConfig`, and knows the model family:
which ``transformers`` class to load, where its classification head lives and how to
replace it for ``num_classes`` outputs. One subclass per family registers itself by the
checkpoint's ``model_type`` (``ViTProcessor``: ``vit``, ``ResNetProcessor``: ``resnet``).

Documented conversions: every image is converted to RGB first (grayscale and palette
images are replicated to three channels rather than failing in the image processor), then
resized to the processor's size (``image_size``, or the checkpoint's); a model that cannot
take that size raises a :class:`~fusion_bench.errors.ConfigError` when it is loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.tasks.common.base_module import BaseConfig
from fusion_bench.utils.registry import Registry

__all__ = [
    "ClassificationProcessor",
    "PROCESSORS",
    "processor_class_for",
    "load_hf_config",
    "load_image_processor",
    "set_label_names",
    "set_output_size",
]

PROCESSORS: Registry["ClassificationProcessor"] = Registry("image classification model type")


def _from_pretrained(loader: Any, path: str | Path, *, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)`` with a one-line :class:`ModelLoadError` on failure."""
    try:
        return loader.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{what}: cannot load {str(path)!r} ({first})") from None


def load_hf_config(path: str | Path, *, what: str = "model") -> Any:
    """The ``transformers`` config of a hub id or local folder."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, what=what)


def load_image_processor(path: str | Path, *, what: str = "image processor") -> Any:
    """The Hugging Face image processor saved with a model (hub id or local folder)."""
    from transformers import AutoImageProcessor

    return _from_pretrained(AutoImageProcessor, path, what=what)


def processor_class_for(model_type: str) -> type["ClassificationProcessor"]:
    """The processor class of a checkpoint's ``model_type`` (``vit``, ``resnet``).

    Raises:
        UnknownNameError: the model family is not supported; lists the supported ones.
    """
    import fusion_bench.tasks.classification  # noqa: F401  (registers the processors)

    return PROCESSORS.get(str(model_type))


class ClassificationProcessor:
    """Preprocessing and head surgery of one model family (subclasses set the class attributes).

    Args:
        config: the run's config (``model_name`` gives the image processor unless
            ``image_processor`` is passed; ``image_size`` overrides its output size; the
            augmentation fields apply to training batches).
        image_processor: a Hugging Face image processor to use instead of ``model_name``'s.
    """

    model_type: ClassVar[str] = ""
    model_class_name: ClassVar[str] = ""  # the transformers class with a classification head
    head_prefix: ClassVar[str] = "classifier."  # state-dict prefix of the head's tensors

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.model_type:
            PROCESSORS.register(cls.model_type)(cls)

    def __init__(self, config: BaseConfig, *, image_processor: Any = None) -> None:
        if not isinstance(config, BaseConfig):
            raise ConfigError(f"{type(self).__name__}: config must be a BaseConfig, got {type(config).__name__}")
        self.config = config
        if image_processor is None:
            image_processor = load_image_processor(config.model_name, what=f"{type(self).__name__} image processor")
        self.image_processor = copy.deepcopy(image_processor)
        if config.image_size is not None:
            set_output_size(self.image_processor, config.image_size)
        self._augment = self._build_augmentation()

    # ---- images ---------------------------------------------------------------------------

    def _build_augmentation(self) -> Any:
        from torchvision import transforms as T

        cfg, steps = self.config, []
        if cfg.random_resized_crop is not None:
            steps.append(T.RandomResizedCrop(self.output_size(), scale=(cfg.random_resized_crop, 1.0)))
        if cfg.horizontal_flip:
            steps.append(T.RandomHorizontalFlip())
        if cfg.color_jitter > 0:
            steps.append(
                T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter, saturation=cfg.color_jitter)
            )
        return T.Compose(steps) if steps else None

    def output_size(self) -> tuple[int, int]:
        """(H, W) of the pixel values this processor produces."""
        from PIL import Image

        pixels = self.image_processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")["pixel_values"]
        return int(pixels.shape[-2]), int(pixels.shape[-1])

    def __call__(
        self, images: Sequence[Any], return_tensors: str = "pt", train: bool = False
    ) -> dict[str, torch.Tensor]:
        """Preprocess PIL images into ``{"pixel_values": (B, 3, H, W)}``.

        Args:
            images: PIL images of any mode and size (converted to RGB).
            return_tensors: only ``"pt"``.
            train: apply the training augmentations first.

        Returns:
            the image processor's output.
        """
        images = [image.convert("RGB") for image in images]
        if train and self._augment is not None:
            images = [self._augment(image) for image in images]
        return self.image_processor(images=images, return_tensors=return_tensors)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the image processor (with this run's size) next to a model."""
        self.image_processor.save_pretrained(str(directory))

    # ---- models ---------------------------------------------------------------------------
    @classmethod
    def model_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.model_class_name)

    def load_model(self, model_ckpt: str | Path | nn.Module) -> nn.Module:
        """Load the model with a head of ``config.num_classes`` outputs.

        Args:
            model_ckpt: hub id, local folder, or an already loaded model of this family.

        Returns:
            the model; its head is replaced (seeded by ``config.seed``) when its size differs
            from ``num_classes``, and ``id2label`` follows ``class_names`` when given.
        """
        if isinstance(model_ckpt, nn.Module):
            model = model_ckpt
        else:
            what = f"{type(self).__name__}: model {str(model_ckpt)!r}"
            self.check_model_type(getattr(load_hf_config(model_ckpt, what=what), "model_type", None), what=what)
            model = _from_pretrained(self.model_class(), model_ckpt, what=what)
        self.check_model(model)
        cfg = self.config
        if cfg.num_classes is not None and model.config.num_labels != cfg.num_classes:
            self.replace_head(model, cfg.num_classes, seed=cfg.seed)
        if cfg.class_names is not None:
            set_label_names(model, cfg.class_names)
        return model

    @classmethod
    def check_model_type(cls, model_type: str | None, *, what: str) -> None:
        if model_type != cls.model_type:
            hint = ""
            if model_type in PROCESSORS:
                hint = f"; use {PROCESSORS.get(model_type).__name__}"
            raise ConfigError(f"{what} is a {model_type!r} model, not {cls.model_type!r}{hint}")

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` unless ``model`` is of this family and takes this processor's images."""
        config = getattr(model, "config", None)
        what = f"{type(self).__name__}: the model"
        self.check_model_type(getattr(config, "model_type", None), what=what)
        if not hasattr(model, self.head_prefix.rstrip(".")):
            raise ConfigError(
                f"{what} is a {type(model).__name__} without a classification head; load {self.model_class_name}"
            )
        if getattr(config, "num_channels", 3) != 3:
            raise ConfigError(
                f"{what} takes {config.num_channels}-channel images; only RGB (3-channel) models are supported"
            )

    @classmethod
    def new_head(cls, model: nn.Module, num_classes: int) -> nn.Module:
        """A freshly initialised head of ``num_classes`` outputs for ``model`` (per family)."""
        raise NotImplementedError

    @classmethod
    def replace_head(cls, model: nn.Module, num_classes: int, *, seed: int = 0) -> nn.Module:
        """Give ``model`` a new head of ``num_classes`` outputs (in place).

        The new linear layer's weight is drawn from N(0, ``initializer_range``²) (the family's own
        init, 0.02 by default) with a generator seeded by ``seed``; its bias is 0. The model's
        ``config.num_labels`` and label maps follow.

        Returns:
            ``model``.
        """
        head = cls.new_head(model, num_classes)
        std = float(getattr(model.config, "initializer_range", 0.02))
        generator = torch.Generator().manual_seed(seed)
        for module in head.modules():
            if isinstance(module, nn.Linear):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.zero_()
        old = getattr(model, cls.head_prefix.rstrip("."))
        ref = next(old.parameters(), None) if isinstance(old, nn.Module) else None
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        setattr(model, cls.head_prefix.rstrip("."), head)
        set_label_names(model, [f"LABEL_{i}" for i in range(num_classes)])
        return model

    @classmethod
    def head_state_dict(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head's tensors under the model's state-dict keys."""
        return {k: v for k, v in model.state_dict().items() if k.startswith(cls.head_prefix)}

    @classmethod
    def with_head(cls, model: nn.Module, head: Mapping[str, torch.Tensor], *, what: str) -> nn.Module:
        """A copy of ``model`` whose head is ``head`` (state-dict keys, any number of classes)."""
        weight_keys = sorted(k for k in head if k.endswith(".weight"))
        if not weight_keys:
            raise ModelLoadError(f"{what}: no head weight under {cls.head_prefix!r}; keys: {sorted(head)}")
        num_classes = int(head[weight_keys[-1]].shape[0])
        new = copy.deepcopy(model)
        cls.replace_head(new, num_classes)
        missing, unexpected = new.load_state_dict(dict(head), strict=False)
        missing = [k for k in missing if k.startswith(cls.head_prefix)]
        if missing or unexpected:
            raise ModelLoadError(
                f"{what}: head tensors do not fit {cls.model_class_name}: missing {missing}, unexpected {unexpected}"
            )
        return new


def set_output_size(image_processor: Any, image_size: int) -> None:
    """Make a Hugging Face image processor produce ``image_size`` x ``image_size`` inputs (in place).

    Processors sized by ``shortest_edge`` (ConvNext/ResNet, CLIP) keep that form (ConvNext then
    centre-crops by its ``crop_pct``; processors with a ``crop_size`` crop to the square);
    processors sized by ``height``/``width`` (ViT) get the square.
    """
    size = dict(getattr(image_processor, "size", None) or {})
    if "shortest_edge" in size:
        image_processor.size = {"shortest_edge": image_size}
        if getattr(image_processor, "crop_size", None) is not None:
            image_processor.crop_size = {"height": image_size, "width": image_size}
    else:
        image_processor.size = {"height": image_size, "width": image_size}


def set_label_names(model: nn.Module, names: Sequence[str]) -> None:
    """Set ``config.num_labels``, ``id2label`` and ``label2id`` of a Hugging Face model."""
    names = list(names)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.config.num_labels = len(names)
    if hasattr(model, "num_labels"):
        model.num_labels = len(names)
