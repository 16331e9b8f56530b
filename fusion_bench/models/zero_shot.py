"""Zero-shot classification with CLIP: text-derived heads and a classifier module.

Head (as CLIP and open_clip build it): for each class, encode every template filled with
the class name, project, L2-normalise, average over templates, re-normalise. Logits are
``exp(logit_scale) * normalise(visual_projection(pooled image)) @ W.T``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.utils.io import atomic_write

__all__ = [
    "build_zero_shot_classifier",
    "zero_shot_head_cache_key",
    "cached_zero_shot_classifier",
    "text_tower_fingerprint",
    "CLIPZeroShotClassifier",
]


def _tokenize(tokenizer: Any, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def build_zero_shot_classifier(
    clip_model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Class embeddings from the text tower.

    Args:
        clip_model: a transformers ``CLIPModel`` (text tower + ``text_projection``).
        tokenizer: its tokenizer.
        classnames: C class names.
        templates: T format strings with one ``{}``.

    Returns:
        ``W`` of shape (C, D), each row L2-normalised, float32.
    """
    device = next(clip_model.parameters()).device
    rows = []
    for name in classnames:
        batch = _tokenize(tokenizer, [t.format(name) for t in templates], device)
        pooled = clip_model.text_model(**batch).pooler_output  # (T, H)
        emb = F.normalize(clip_model.text_projection(pooled).float(), dim=-1)  # (T, D)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))  # (D,)
    return torch.stack(rows)  # (C, D)


def text_tower_fingerprint(clip_model: nn.Module) -> str:
    """Content hash of everything the heads depend on in the model (text tower, projection)."""
    h = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(clip_model.state_dict().items()):
        if key.startswith(("text_model.", "text_projection")):
            h.update(key.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def zero_shot_head_cache_key(
    fingerprint: str, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str]
) -> str:
    """Cache key: text-tower content + the exact token ids of every prompt."""
    h = hashlib.blake2b(digest_size=20)
    h.update(fingerprint.encode())
    for name in classnames:
        ids = tokenizer([t.format(name) for t in templates], padding=True, truncation=True)["input_ids"]
        h.update(repr((name, list(templates), ids)).encode())
    return h.hexdigest()


def cached_zero_shot_classifier(
    clip_model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    cache_dir: str | Path | None,
    fingerprint: str | None = None,
) -> torch.Tensor:
    """:func:`build_zero_shot_classifier`, cached on disk by content hash (``cache_dir=None``: no cache)."""
    if cache_dir is None:
        return build_zero_shot_classifier(clip_model, tokenizer, classnames, templates)
    from safetensors.torch import load_file, save

    fingerprint = fingerprint or text_tower_fingerprint(clip_model)
    path = (
        Path(cache_dir).expanduser()
        / f"{zero_shot_head_cache_key(fingerprint, tokenizer, classnames, templates)}.safetensors"
    )
    if path.is_file():
        return load_file(str(path))["head"]
    head = build_zero_shot_classifier(clip_model, tokenizer, classnames, templates)
    with atomic_write(path, "wb") as f:
        f.write(save({"head": head.cpu().contiguous()}))
    return head


class CLIPZeroShotClassifier(nn.Module):
    """Image -> class logits with a CLIP vision encoder and a fixed text-derived head.

    Args:
        vision_model: a CLIP vision encoder returning ``pooler_output``.
        visual_projection: the CLIP model's ``visual_projection``.
        logit_scale: the CLIP model's (log) ``logit_scale`` scalar.
        head: (C, D) normalised class embeddings.
    """

    def __init__(
        self, vision_model: nn.Module, visual_projection: nn.Module, logit_scale: torch.Tensor, head: torch.Tensor
    ):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.register_buffer("logit_scale_exp", logit_scale.detach().float().exp().reshape(()))
        self.register_buffer("head", head.detach().float())

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised projected image features, (B, D) float32, then the vision model's
        ``transform_image_embeds`` if it has one (a task's Representation Surgery)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # (B, H)
        embeds = F.normalize(self.visual_projection(pooled).float(), dim=-1)
        transform = getattr(self.vision_model, "transform_image_embeds", None)
        return embeds if transform is None else transform(embeds).float()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logit_scale_exp * self.image_embeds(pixel_values) @ self.head.T  # (B, C)
