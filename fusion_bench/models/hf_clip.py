"""Hugging Face CLIP vision encoders across transformers 4 and 5.

transformers 4: ``CLIPVisionModel.vision_model`` is a ``CLIPVisionTransformer`` and state
dict keys carry a ``vision_model.`` prefix. transformers 5: ``CLIPVisionModel`` *is* the
transformer (no ``.vision_model``), its state dict keys are bare (``embeddings.*``,
``encoder.layers.*``), yet ``save_pretrained`` still writes prefixed keys, and
``CLIPModel.vision_model`` is a ``CLIPVisionModel``. Checkpoints on the hub use the prefixed
layout. Here everything is normalised to the *bare* (canonical) keys at the boundary.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError

__all__ = [
    "VISION_PREFIX",
    "CLIP_VISION_MODEL_TYPES",
    "CLIPVisionModelWrapper",
    "canonical_vision_keys",
    "vision_config_from_dict",
    "is_clip_vision_model",
    "vision_encoder_layers",
    "vision_state_dict",
    "load_vision_state_dict",
    "build_clip_vision_model",
]

VISION_PREFIX = "vision_model."
CLIP_VISION_MODEL_TYPES = ("clip", "clip_vision_model")
_NON_VISION_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def canonical_vision_keys(raw_keys: list[str]) -> dict[str, str]:
    """Map a checkpoint's raw keys to ``{canonical_key: raw_key}`` for the vision encoder.

    Keeps only ``vision_model.*`` (prefix stripped) when the checkpoint has any; otherwise
    every key except the text tower and projections of a full CLIP checkpoint.
    """
    prefixed = [k for k in raw_keys if k.startswith(VISION_PREFIX)]
    if prefixed:
        return {k[len(VISION_PREFIX) :]: k for k in prefixed}
    return {k: k for k in raw_keys if not k.startswith(_NON_VISION_PREFIXES)}


def vision_config_from_dict(config: Mapping[str, Any], *, what: str):
    """A ``CLIPVisionConfig`` from a ``config.json`` dict of a CLIP or CLIP-vision model."""
    from transformers import CLIPVisionConfig

    model_type = config.get("model_type")
    if model_type not in CLIP_VISION_MODEL_TYPES:
        raise ModelLoadError(
            f"{what} is a {model_type!r} model, not a CLIP vision model "
            f"(expected model_type {' or '.join(map(repr, CLIP_VISION_MODEL_TYPES))})"
        )
    if model_type == "clip":
        vision = dict(config.get("vision_config") or {})
        vision.pop("model_type", None)
        return CLIPVisionConfig(**vision)
    return CLIPVisionConfig(**{k: v for k, v in config.items() if k != "model_type"})


class CLIPVisionModelWrapper(nn.Module):
    """Base class of modules that stand in for a CLIP vision encoder.

    A subclass holds the encoder it wraps as ``self.vision_model`` and its ``forward(pixel_values=...)``
    returns what ``CLIPVisionModel`` returns (an object with ``pooler_output``), so task pools and
    classifiers accept it (:func:`is_clip_vision_model`). Example:
    :class:`fusion_bench.models.wemoe.WEMoECLIPVisionModel` (MLPs upscaled into weight-ensembling MoEs).
    """


def is_clip_vision_model(model: Any) -> bool:
    """Whether ``model`` is a transformers CLIP vision encoder (4.x or 5.x layout) or a
    :class:`CLIPVisionModelWrapper`."""
    from transformers import CLIPVisionModel

    if isinstance(model, (CLIPVisionModel, CLIPVisionModelWrapper)):
        return True
    try:  # transformers 4 exposes the inner transformer too
        from transformers.models.clip.modeling_clip import CLIPVisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, CLIPVisionTransformer)


def _inner(model: nn.Module) -> nn.Module:
    """The module that owns ``embeddings``/``encoder`` (itself in transformers 5; wrappers unwrapped)."""
    while not hasattr(model, "encoder") and hasattr(model, "vision_model"):
        model = model.vision_model
    return model


def vision_encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a CLIP vision model."""
    inner = _inner(model)
    try:
        return inner.encoder.layers
    except AttributeError:
        raise ModelLoadError(f"{type(model).__name__} is not a CLIP vision model (no encoder.layers)") from None


def vision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with canonical (bare) keys."""
    sd = model.state_dict()
    return {k[len(VISION_PREFIX) :] if k.startswith(VISION_PREFIX) else k: v for k, v in sd.items()}


def load_vision_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load a canonical-key state dict into ``model`` strictly, naming any mismatch."""
    own = model.state_dict()
    prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in own) else ""
    mapped = {prefix + k: v for k, v in state_dict.items()}
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f"{what}: checkpoint does not match the CLIP vision architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, tensor in mapped.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{what}: tensor {key[len(prefix) :]!r} has shape {tuple(tensor.shape)}, "
                f"the architecture expects {tuple(own[key].shape)}"
            )
    own_dtypes = {k: v.dtype for k, v in own.items()}
    if all(mapped[k].dtype == own_dtypes[k] for k in mapped):
        # adopt the tensors instead of copying them: no second copy of the weights in memory
        model.load_state_dict(mapped, strict=True, assign=True)
    else:
        model.load_state_dict(mapped, strict=True)


def _no_init_weights():
    """transformers' context that skips random initialisation (its location moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def build_clip_vision_model(config, state_dict: Mapping[str, torch.Tensor], *, what: str) -> nn.Module:
    """A ``CLIPVisionModel`` with ``config`` and weights ``state_dict`` (canonical keys),
    in the checkpoint's floating-point dtype. Random initialisation is skipped: every
    parameter is overwritten (strictly) by the checkpoint."""
    from transformers import CLIPVisionModel

    with _no_init_weights():
        model = CLIPVisionModel(config)
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    load_vision_state_dict(model, state_dict, what=what)
    return model.eval()


def _path_of(cfg: Any) -> str:
    return str(cfg["pretrained_model_name_or_path"] if isinstance(cfg, Mapping) else cfg)


def _call_target(cfg: Mapping[str, Any], what: str) -> Any:
    from fusion_bench.utils.instantiate import call_with_options, resolve_target

    opts = dict(cfg)
    return call_with_options(resolve_target(opts.pop("_target_"), what=what), opts, what=what)


def load_clip_processor(cfg: Any, *, what: str = "processor") -> Any:
    """A ``CLIPProcessor`` from a path / ``{pretrained_model_name_or_path}`` / ``_target_`` config."""
    from transformers import CLIPProcessor

    if isinstance(cfg, Mapping) and "_target_" in cfg:
        return _call_target(cfg, what)
    path = _path_of(cfg)
    try:
        return CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{what}: cannot load a CLIPProcessor from {path!r} ({err.__class__.__name__})") from None


def load_clip_model(cfg: Any, *, what: str = "clip_model") -> nn.Module:
    """A full ``CLIPModel`` (text + vision towers) from a path / mapping / ``_target_`` config."""
    from transformers import CLIPModel

    if isinstance(cfg, Mapping) and "_target_" in cfg:
        model = _call_target(cfg, what)
    else:
        path = _path_of(cfg)
        try:
            model = CLIPModel.from_pretrained(path, revision=cfg.get("revision") if isinstance(cfg, Mapping) else None)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{what}: cannot load a CLIPModel from {path!r} ({err.__class__.__name__}: {err})"
            ) from None
    if not isinstance(model, CLIPModel):
        raise ModelLoadError(f"{what}: expected a CLIPModel, got {type(model).__name__}")
    return model
