"""Tiny random CLIP models and their "fine-tuned" vision-encoder variants, seeded and saved locally."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from fusion_bench.testing.tokenizer import _quiet_progress, train_tiny_clip_tokenizer

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, CLIPVisionModel

__all__ = ["KeyLayout", "build_tiny_clip", "make_finetuned_variant"]

KeyLayout = Literal["prefixed", "bare"]
VISION_PREFIX = "vision_model."
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _clip_config(tokenizer: CLIPTokenizer, image_size: int, patch_size: int, projection_dim: int, **layers: int) -> Any:
    """A ``CLIPConfig`` whose text tower matches ``tokenizer`` (vocab size, special ids).

    Args:
        tokenizer: the model's tokenizer.
        image_size: input resolution of the vision tower.
        patch_size: ViT patch size.
        projection_dim: size of the joint embedding.
        **layers: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads`` (shared by both towers).

    Returns:
        the ``transformers.CLIPConfig``.
    """
    from transformers import CLIPConfig

    text = dict(
        layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(layers, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _image_processor(image_size: int) -> Any:
    """A ``CLIPImageProcessor`` resizing/cropping to ``image_size`` with CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def build_tiny_clip(
    out_dir: str | Path,
    *,
    corpus: Sequence[str],
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 16,
) -> Path:
    """Save a randomly initialised tiny ``CLIPModel`` and its ``CLIPProcessor`` to ``out_dir``.

    Args:
        out_dir: the model folder (created if needed).
        corpus: texts to train the tokenizer on (see :func:`train_tiny_clip_tokenizer`).
        seed: seed of the weight initialisation (the global torch RNG state is restored).
        hidden_size: width of both towers.
        intermediate_size: MLP width of both towers.
        num_layers: transformer layers per tower.
        num_heads: attention heads per layer.
        image_size: input resolution (the image processor resizes and crops to it).
        patch_size: ViT patch size.
        projection_dim: size of the joint image-text embedding.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    tokenizer = train_tiny_clip_tokenizer(out_dir, corpus)
    config = _clip_config(
        tokenizer,
        image_size,
        patch_size,
        projection_dim,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = _image_processor(image_size)
    with _quiet_progress():
        model.save_pretrained(str(out_dir))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))
    image_processor.save_pretrained(str(out_dir))  # also the standalone preprocessor_config.json
    return out_dir


def _load_base_vision(base_dir: str | Path) -> CLIPVisionModel:
    """The vision tower of the CLIP model in ``base_dir`` as a ``CLIPVisionModel``.

    Goes through ``CLIPModel`` so the text tower's weights are not reported as unexpected.

    Args:
        base_dir: a full CLIP checkpoint folder.

    Returns:
        the vision model (eval mode, float32).
    """
    from transformers import CLIPModel, CLIPVisionModel

    with _quiet_progress():
        clip = CLIPModel.from_pretrained(str(base_dir))
    if isinstance(clip.vision_model, CLIPVisionModel):  # transformers >= 5
        vision = clip.vision_model
    else:  # pragma: no cover - transformers 4: wrap the inner CLIPVisionTransformer
        vision = CLIPVisionModel(clip.config.vision_config)
        vision.vision_model = clip.vision_model
    vision.config.architectures = ["CLIPVisionModel"]
    return vision.eval()


def _bare_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with bare keys (``embeddings.*``, ``encoder.*``), contiguous, on CPU."""
    state = model.state_dict()
    return {k.removeprefix(VISION_PREFIX): v.detach().cpu().contiguous() for k, v in state.items()}


def _perturb_(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add seeded noise of std ``scale * (param std + 1e-3)`` to every float parameter, in place.

    Args:
        model: the model to perturb.
        seed: seed of the noise (a private generator; the global RNG is untouched).
        scale: noise size relative to each parameter's spread.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.is_floating_point():
                spread = param.float().std().nan_to_num(0.0) if param.numel() > 1 else torch.tensor(0.0)
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_((noise * scale * (spread + 1e-3)).to(param.dtype))


def make_finetuned_variant(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    scale: float = 0.02,
    key_layout: KeyLayout = "prefixed",
) -> Path:
    """Save a seeded perturbation of the base CLIP's vision tower as a ``CLIPVisionModel``.

    ``out_dir`` gets ``config.json`` (``model_type`` ``clip_vision_model``),
    ``model.safetensors`` and the base's ``preprocessor_config.json``.

    Args:
        base_dir: the full CLIP checkpoint (see :func:`build_tiny_clip`).
        out_dir: the variant's folder (created if needed).
        seed: seed of the perturbation.
        scale: noise std relative to each parameter's std (plus ``1e-3``).
        key_layout: ``"prefixed"`` writes ``vision_model.*`` keys (the hub's / transformers 4
            layout, what ``save_pretrained`` writes); ``"bare"`` writes ``embeddings.*``,
            ``encoder.*``, ... (transformers 5 ``state_dict`` names).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    if key_layout not in ("prefixed", "bare"):
        raise ValueError(f"key_layout must be 'prefixed' or 'bare', got {key_layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load_base_vision(base_dir)
    _perturb_(model, seed, scale)
    state = _bare_state_dict(model)
    if key_layout == "prefixed":
        state = {VISION_PREFIX + k: v for k, v in state.items()}
    model.config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    CLIPImageProcessor.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    return out_dir
