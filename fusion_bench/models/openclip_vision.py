"""OpenCLIP vision encoders and classification heads, in the task_vectors checkpoint layout.

Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023 (https://arxiv.org/abs/2212.04089)
released its experts as pickled ``src.modeling.ImageEncoder`` objects (an open_clip ``CLIP``
whose text transformer was deleted) and ``ClassificationHead`` s (a ``Linear`` over normalised
features, rows = ``exp(logit_scale)`` × zero-shot class embeddings). Here:

* :class:`OpenCLIPArchitecture` names an architecture: an open_clip model name (``ViT-B-32``;
  ``name__pretrained__tag`` takes QuickGELU and mean/std from open_clip's pretrained tag, default
  ``openai`` as in task_vectors) or a custom config ``{embed_dim, vision_cfg, quick_gelu?}``;
  nothing is ever downloaded: weights come from the checkpoint.
* :class:`ImageEncoder` holds only the vision tower, with the keys of the task_vectors state
  dicts (``model.visual.*``); :func:`canonical_openclip_keys` maps ``model.visual.*``,
  ``visual.*`` (an open_clip ``CLIP`` state dict) and bare tower keys to them.
* :class:`ClassificationHead` as in task_vectors (``normalize`` then ``Linear``).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError

__all__ = [
    "OpenCLIPArchitecture",
    "ImageEncoder",
    "ClassificationHead",
    "TransformImageProcessor",
    "ENCODER_PREFIX",
    "canonical_openclip_keys",
    "build_image_encoder",
    "infer_architecture",
    "task_vectors_redirect",
]

ENCODER_PREFIX = "model.visual."
_RAW_PREFIXES = ("model.visual.", "visual.", "module.model.visual.", "module.visual.")
_DEFAULT_TAG = "openai"


def _open_clip():
    import open_clip

    return open_clip


@dataclass(frozen=True)
class OpenCLIPArchitecture:
    """An OpenCLIP vision tower's architecture and preprocessing.

    Attributes:
        embed_dim: the joint embedding size (output of the tower's projection).
        vision_cfg: open_clip's ``vision_cfg`` (``layers``, ``width``, ``patch_size``, ``image_size``...).
        quick_gelu: QuickGELU activations (OpenAI-trained models) instead of GELU.
        mean / std: image normalisation.
        model_name: the open_clip name it came from (None: a custom config).
    """

    embed_dim: int
    vision_cfg: dict = field(hash=False)
    quick_gelu: bool = False
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    model_name: str | None = None

    @classmethod
    def from_name(cls, model_name: str, *, what: str = "model") -> "OpenCLIPArchitecture":
        """The architecture of an open_clip model name (``ViT-B-32`` or ``ViT-B-32__pretrained__<tag>``).

        Raises:
            ModelLoadError: the name is not a registered open_clip architecture.
        """
        oc = _open_clip()
        name, _, tag = str(model_name).partition("__pretrained__")
        cfg = oc.get_model_config(name)
        if cfg is None:
            known = oc.list_models()
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ModelLoadError(
                f"{what}: unknown OpenCLIP architecture {name!r}.{hint} ({len(known)} are registered, see "
                f"open_clip.list_models()); or give model_config: {{embed_dim, vision_cfg}}"
            )
        pretrained = oc.get_pretrained_cfg(name, tag or _DEFAULT_TAG) or {}
        extra = {k: tuple(pretrained[k]) for k in ("mean", "std") if k in pretrained}
        quick_gelu = bool(cfg.get("quick_gelu", False) or pretrained.get("quick_gelu", False))
        return cls(int(cfg["embed_dim"]), dict(cfg["vision_cfg"]), quick_gelu, model_name=str(model_name), **extra)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, what: str = "model") -> "OpenCLIPArchitecture":
        """From ``{embed_dim, vision_cfg, quick_gelu?, mean?, std?, model_name?}`` (open_clip's JSON format)."""
        config = dict(config)
        if "model_cfg" in config:  # an open_clip_config.json
            config = {**config.pop("model_cfg"), **config.pop("preprocess_cfg", {}), **config}
        unknown = sorted(
            set(config)
            - {
                "embed_dim",
                "vision_cfg",
                "text_cfg",
                "quick_gelu",
                "mean",
                "std",
                "model_name",
                "custom_text",
                "size",
                "interpolation",
                "resize_mode",
                "fill_color",
            }
        )
        if unknown or "embed_dim" not in config or not isinstance(config.get("vision_cfg"), Mapping):
            raise ModelLoadError(
                f"{what}: model_config needs 'embed_dim' and a 'vision_cfg' mapping (open_clip's format); "
                f"got keys {sorted(config)}"
            )
        extra = {k: tuple(config[k]) for k in ("mean", "std") if config.get(k) is not None}
        return cls(
            int(config["embed_dim"]),
            dict(config["vision_cfg"]),
            bool(config.get("quick_gelu", False)),
            model_name=config.get("model_name"),
            **extra,
        )

    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_config` reads back."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    def build_tower(self) -> nn.Module:
        """A randomly initialised vision tower (open_clip's ``_build_vision_tower``)."""
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(self.embed_dim, dict(self.vision_cfg), self.quick_gelu)

    def transform(self, *, is_train: bool = False) -> Any:
        """open_clip's image transform for this architecture (PIL image -> (3, H, W) tensor)."""
        return _open_clip().image_transform(self.image_size, is_train=is_train, mean=self.mean, std=self.std)

    def __str__(self) -> str:
        return repr(self.model_name) if self.model_name else f"custom config {self.vision_cfg}"


class _VisionOnly(nn.Module):
    """The part of an open_clip ``CLIP`` that an image encoder keeps: ``visual``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.visual(images)  # (B, D)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats


class ImageEncoder(nn.Module):
    """An OpenCLIP vision tower: images (B, 3, H, W) -> projected features (B, D), not normalised.

    Args:
        architecture: what to build.
        visual: an existing tower to use (None: build one, randomly initialised).
    """

    def __init__(self, architecture: OpenCLIPArchitecture, visual: nn.Module | None = None) -> None:
        super().__init__()
        self.architecture = architecture
        self.model = _VisionOnly(visual if visual is not None else architecture.build_tower())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.visual(images)  # (B, D)

    @property
    def val_preprocess(self) -> Any:
        """open_clip's evaluation transform (resize, centre crop, RGB, normalise): PIL -> (3, H, W)."""
        return self.architecture.transform(is_train=False)

    @property
    def train_preprocess(self) -> Any:
        """open_clip's training transform (random resized crop)."""
        return self.architecture.transform(is_train=True)


class ClassificationHead(nn.Linear):
    """``Linear(normalise(features))`` (task_vectors' head; ``normalize=False`` skips the norm).

    Args:
        normalize: L2-normalise the features first.
        weights: (C, D).
        biases: (C,) (None: zeros).
    """

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None) -> None:
        out_features, in_features = weights.shape
        super().__init__(in_features, out_features, device="meta")
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(weights.detach().clone())
        self.bias = nn.Parameter(
            biases.detach().clone() if biases is not None else torch.zeros(out_features, dtype=weights.dtype)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)  # (B, C)


class TransformImageProcessor:
    """A torchvision transform behind the image-processor call ``(images=[...], return_tensors="pt")``,
    so :class:`~fusion_bench.data.loading.ImageClassificationCollate` can use it."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}  # (B, 3, H, W)


def canonical_openclip_keys(raw_keys: list[str]) -> dict[str, str]:
    """Map a checkpoint's raw keys to ``{model.visual.*: raw_key}``, dropping non-vision keys.

    Accepts task_vectors ``ImageEncoder`` state dicts (``model.visual.*`` plus text leftovers),
    open_clip ``CLIP`` state dicts (``visual.*``) and bare vision-tower state dicts (``conv1.weight``...).
    """
    for prefix in _RAW_PREFIXES:
        keys = [k for k in raw_keys if k.startswith(prefix)]
        if keys:
            return {ENCODER_PREFIX + k[len(prefix) :]: k for k in keys}
    if "conv1.weight" in raw_keys or any(k.startswith("trunk.") for k in raw_keys):  # a bare tower
        return {ENCODER_PREFIX + k: k for k in raw_keys}
    return {}


def _describe_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        return (
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            return f"tensor {key!r} has shape {tuple(tensor.shape)}, the architecture expects {tuple(own[key].shape)}"
    return None


def build_image_encoder(
    architecture: OpenCLIPArchitecture, state_dict: Mapping[str, torch.Tensor], *, what: str
) -> ImageEncoder:
    """An :class:`ImageEncoder` of ``architecture`` holding ``state_dict`` (``model.visual.*`` keys).

    The tower is built on the meta device and adopts the checkpoint's tensors (no random
    initialisation, no second copy).

    Raises:
        ModelLoadError: the state dict does not fit the architecture (names the first mismatch).
    """
    with torch.device("meta"):
        encoder = ImageEncoder(architecture)
    problem = _describe_mismatch(encoder.state_dict(), state_dict)
    if problem is not None:
        raise ModelLoadError(
            f"{what}: the checkpoint does not match the OpenCLIP architecture {architecture} ({problem}); "
            f"check model_name / model_config"
        )
    encoder.load_state_dict(dict(state_dict), strict=True, assign=True)
    return encoder.eval()


def infer_architecture(visual: nn.Module, *, what: str) -> OpenCLIPArchitecture:
    """The architecture of an unpickled open_clip ViT tower (any open_clip version).

    Raises:
        ModelLoadError: not a plain open_clip ViT tower (then the checkpoint needs ``model_name``).
    """
    try:
        conv, blocks, pos = visual.conv1, list(visual.transformer.resblocks), visual.positional_embedding
        width, patch = int(conv.out_channels), int(conv.kernel_size[0])
        grid = round((pos.shape[0] - 1) ** 0.5)
        heads = int(blocks[0].attn.num_heads)
        mlp_width = int(blocks[0].mlp.c_fc.out_features)
        embed_dim = int(visual.proj.shape[1])
        act = type(blocks[0].mlp.gelu).__name__
    except (AttributeError, IndexError, TypeError) as err:
        raise ModelLoadError(
            f"{what}: unknown OpenCLIP architecture: the pickled {type(visual).__name__} is not a plain open_clip "
            f"ViT ({err.__class__.__name__}: {err}); give its model_name (e.g. 'ViT-B-32')"
        ) from None
    vision_cfg = {
        "image_size": grid * patch,
        "layers": len(blocks),
        "width": width,
        "patch_size": patch,
        "head_width": width // heads,
        "mlp_ratio": mlp_width / width,
    }
    return OpenCLIPArchitecture(embed_dim, vision_cfg, quick_gelu=(act == "QuickGELU"))


class _Pickled(nn.Module):
    """Stand-in for task_vectors' ``src.modeling`` classes while unpickling (only the state is used)."""


def task_vectors_redirect(module: str, name: str) -> Any:
    """Where the classes named by task_vectors pickles live now (for :func:`load_pickle_file`).

    ``src.modeling.*`` (the task_vectors repository, not installed) -> a plain module stand-in;
    open_clip 2.0's ``open_clip.model.VisualTransformer`` etc. -> their current homes.
    """
    if module == "src.modeling" or module.startswith("src.modeling."):
        return _Pickled
    if module.startswith("open_clip."):
        import importlib

        renamed = {"VisualTransformer": "VisionTransformer"}.get(name, name)
        for home in (module, "open_clip.transformer", "open_clip.model", "open_clip.transform"):
            try:
                found = getattr(importlib.import_module(home), renamed, None)
            except ImportError:
                continue
            if found is not None:
                return found
    return None
