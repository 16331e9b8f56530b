"""Hugging Face image classifiers (ViT, ResNet) fine-tuned from one pre-trained model.

Each fine-tuned model has its own task's head (``classifier.*``, a different number of
classes per task); the *backbone* is what the data-free methods merge. Per-tensor access
(``keys``/``get_tensor``/``tensor_source``, read from safetensors) therefore covers the
backbone only, and says so explicitly:

* ``heads="exclude"`` (default): head tensors are not offered to merges; the merged model
  keeps the output buffer model's head, and the task pool attaches each task's own head
  (:class:`~fusion_bench.taskpool.image_classification.ImageClassificationTaskPool`).
  ``heads="merge"`` offers them too, for pools whose heads share one label set; heads of
  different shapes then stop the merge with an error naming the model and tensor, never
  an average of mismatched tensors.
* ``batchnorm_statistics="exclude"`` (default): BatchNorm running statistics are not merged
  (the merged model carries the buffer model's, to be recomputed on data; see
  :mod:`fusion_bench.models.batchnorm` for why averaging them is wrong); ``"merge"`` treats
  ``running_mean``/``running_var`` like weights (the naive baseline). ``num_batches_tracked``
  counters are never merged.

Keys are normalised to the ``<Family>ForImageClassification`` layout (``vit.*`` /
``resnet.*`` + ``classifier.*``): a bare base-model checkpoint (``ViTModel``, keys
``embeddings.*``) gets the prefix and loses its unused pooler. Model entries take the forms
of :class:`~fusion_bench.modelpool.CLIPVisionModelPool` (hub id or folder,
``{pretrained_model_name_or_path, revision?, torch_dtype?}``, ``_target_``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelLoadError, ModelPoolError, UnknownNameError
from fusion_bench.modelpool.base_pool import PRETRAINED, BaseModelPool, register_modelpool
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool, _Checkpoint
from fusion_bench.modelpool.lazy_tensors import SafetensorsSource, StateDictSource, TensorSource
from fusion_bench.models.batchnorm import is_batchnorm_buffer
from fusion_bench.tasks.classification.processor import (
    PROCESSORS,
    ClassificationProcessor,
    load_image_processor,
    processor_class_for,
)
from fusion_bench.utils.instantiate import to_container

__all__ = [
    "HFImageClassificationModelPool",
    "canonical_classifier_keys",
    "checkpoint_layout_state_dict",
    "is_image_classifier",
]

log = logging.getLogger(__name__)

HEAD_CHOICES = ("exclude", "merge")
BATCHNORM_CHOICES = ("exclude", "merge")


def canonical_classifier_keys(raw_keys: list[str], *, prefix: str, head_prefix: str) -> dict[str, str]:
    """Map a checkpoint's raw keys to ``{canonical_key: raw_key}`` (module docstring's layout).

    Args:
        raw_keys: the checkpoint's keys.
        prefix: the family's base-model prefix (``vit``, ``resnet``).
        head_prefix: the head's key prefix (``classifier.``).
    """
    out = {}
    for key in raw_keys:
        if key.startswith((f"{prefix}.", head_prefix)):
            out[key] = key
        elif not key.startswith("pooler."):  # a bare base model's pooler: unused by the classifier
            out[f"{prefix}.{key}"] = key
    return out


def checkpoint_layout_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the keys its checkpoints use, sharing storage with the model.

    transformers 5 renames some modules in memory and maps the names back on save (a ViT's
    ``attention.q_proj`` is ``attention.attention.query`` in every checkpoint, hub ones
    included); merges address tensors by the checkpoint names, which transformers 4 also uses
    in memory.

    Raises:
        ModelLoadError: the installed transformers converts this model's weights on save
            (splits, fusions) rather than only renaming them.
    """
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: memory and checkpoint layouts agree
        return state
    renamed = revert_weight_conversion(model, state)
    pointers = {t.data_ptr() for t in state.values()}
    if len(renamed) != len(state) or any(t.data_ptr() not in pointers for t in renamed.values()):
        raise ModelLoadError(
            f"{type(model).__name__}: this transformers version converts its weights on save "
            f"beyond renaming; per-tensor merging is not supported for it"
        )
    return renamed


def is_image_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face image classifier of a supported family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in PROCESSORS and hasattr(model, PROCESSORS.get(model_type).head_prefix.rstrip("."))


@register_modelpool("HFImageClassificationModelPool", "image_classification")
class HFImageClassificationModelPool(BaseModelPool):
    """Image classifiers sharing one backbone architecture (see module docstring).

    Args:
        models: ``{name: entry}``; ``_pretrained_`` is the pre-trained model, every other name a
            fine-tuned model (usually named after its task).
        heads: ``exclude`` or ``merge`` (whether merges see the ``classifier.*`` tensors).
        batchnorm_statistics: ``exclude`` or ``merge`` (whether merges see BatchNorm running means/variances).
        processor: the image processor (hub id, folder or ``{pretrained_model_name_or_path}``;
            None: ``_pretrained_``'s, else the first model's).
        train_datasets / val_datasets / test_datasets: ``{task: dataset entry}``.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        heads: str = "exclude",
        batchnorm_statistics: str = "exclude",
        processor: Any = None,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(models, train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets)
        for option, value, choices in (
            ("heads", heads, HEAD_CHOICES),
            ("batchnorm_statistics", batchnorm_statistics, BATCHNORM_CHOICES),
        ):
            if value not in choices:
                raise ConfigError(
                    f"modelpool: option {option!r} must be one of {', '.join(map(repr, choices))}; got {value!r}"
                )
        self.heads, self.batchnorm_statistics = heads, batchnorm_statistics
        self._models = {name: CLIPVisionModelPool._normalise_entry(name, entry) for name, entry in self._models.items()}
        self._processor_cfg = to_container(processor)
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._sources: dict[tuple[str, str], TensorSource] = {}

    # ---- checkpoints ---------------------------------------------------------------------
    def _is_file_entry(self, name: str) -> bool:
        entry = self.get_model_config(name)
        return isinstance(entry, Mapping) and "_target_" not in entry

    def _checkpoint(self, name: str) -> _Checkpoint:
        if name not in self._checkpoints:
            ckpt = CLIPVisionModelPool.find_checkpoint(name, self.get_model_config(name))
            self._check_model_type(ckpt.config.get("model_type"), what=f"model {name!r} ({ckpt.location})")
            self._checkpoints[name] = ckpt
        return self._checkpoints[name]

    @staticmethod
    def _check_model_type(model_type: Any, *, what: str) -> type[ClassificationProcessor]:
        try:
            return processor_class_for(str(model_type))
        except UnknownNameError:
            raise ModelLoadError(
                f"{what} is a {model_type!r} model; image classifier pools take "
                f"{', '.join(map(repr, PROCESSORS.names()))}"
            ) from None

    def processor_class(self, name: str) -> type[ClassificationProcessor]:
        """The processor class (model family) of model ``name``."""
        if self._is_file_entry(name):
            return self._check_model_type(self._checkpoint(name).config.get("model_type"), what=f"model {name!r}")
        return self._check_model_type(getattr(self.load_model(name).config, "model_type", None), what=f"model {name!r}")

    def _merge_key(self, key: str, head_prefix: str) -> bool:
        if key.startswith(head_prefix):
            return self.heads == "merge"
        if is_batchnorm_buffer(key):
            return self.batchnorm_statistics == "merge" and not key.endswith("num_batches_tracked")
        return True

    def _source(self, name: str, part: str) -> TensorSource:
        """Tensors of model ``name``: ``part`` = ``merge`` (what merges see), ``head`` or ``all``."""
        if (name, part) not in self._sources:
            processor_cls = self.processor_class(name)
            head_prefix = processor_cls.head_prefix
            keep: Callable[[str], bool] = {
                "merge": lambda k: self._merge_key(k, head_prefix),
                "head": lambda k: k.startswith(head_prefix),
                "all": lambda k: True,
            }[part]
            prefix = processor_cls.model_class().base_model_prefix
            ckpt = self._checkpoint(name) if self._is_file_entry(name) else None
            what = f"model {name!r}" + (f" ({ckpt.location})" if ckpt else "")
            if ckpt is not None and ckpt.files is not None:

                def rename(raw: list[str]) -> dict[str, str]:
                    keys = canonical_classifier_keys(raw, prefix=prefix, head_prefix=head_prefix)
                    return {k: v for k, v in keys.items() if keep(k)}

                self._sources[(name, part)] = SafetensorsSource(ckpt.files, rename=rename, what=what)
            else:  # _target_ / in-memory / .bin-only models: their state dict
                state = checkpoint_layout_state_dict(self.load_model(name))
                self._sources[(name, part)] = StateDictSource({k: v for k, v in state.items() if keep(k)}, what=what)
        return self._sources[(name, part)]

    def tensor_source(self, name: str) -> TensorSource:
        """The tensors merges see (backbone; heads / BatchNorm statistics per the pool's options)."""
        return self._source(name, "merge")

    def head_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Model ``name``'s head tensors (``classifier.*``), read without loading the backbone."""
        source = self._source(name, "head")
        head = {k: source.get(k) for k in source.keys()}
        if not head:
            raise ModelLoadError(
                f"model {name!r} has no classification head tensors ({self.processor_class(name).head_prefix}*)"
            )
        return head

    def num_classes(self, name: str) -> int:
        """The number of outputs of model ``name``'s head."""
        weights = [v for k, v in self.head_state_dict(name).items() if k.endswith(".weight")]
        return int(weights[-1].shape[0])

    def canonical_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return checkpoint_layout_state_dict(model)

    # ---- models ------------------------------------------------------------------------------
    def _load_model(self, name: str, entry: Any) -> nn.Module:
        if "_target_" in entry:
            return self._load_checked_target(name, entry, is_image_classifier, "a supported image classifier")
        ckpt = self._checkpoint(name)
        cls = self.processor_class(name).model_class()
        try:
            model = cls.from_pretrained(str(entry["pretrained_model_name_or_path"]), revision=entry.get("revision"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"model {name!r} ({ckpt.location}): {str(err).splitlines()[0]}") from None
        if entry.get("torch_dtype"):
            model = model.to(getattr(torch, entry["torch_dtype"]))
        return model.eval()

    # ---- processor and saving ------------------------------------------------------------------
    def load_processor(self) -> Any:
        """The Hugging Face image processor of the pool (see the ``processor`` option)."""
        cfg = self._processor_cfg
        if cfg is None:
            name = PRETRAINED if self.has_pretrained else self.all_model_names[0]
            entry = self._models[name]
            if not isinstance(entry, Mapping) or "pretrained_model_name_or_path" not in entry:
                raise ModelPoolError(f"the pool has no 'processor' and model {name!r} has no path to take it from")
            cfg = entry["pretrained_model_name_or_path"]
        if isinstance(cfg, Mapping):
            cfg = cfg.get("pretrained_model_name_or_path")
        return load_image_processor(str(cfg), what="modelpool processor")

    def _save_extras(self, directory: Path) -> None:
        try:
            self.load_processor().save_pretrained(str(directory))
        except (ModelLoadError, ModelPoolError) as err:  # the weights are still usable without it
            log.warning("merged model saved without an image processor: %s", err)
