"""Contrastive pre-training of a CLIP model on image–caption batches.

Radford et al., *Learning Transferable Visual Models From Natural Language Supervision*,
ICML 2021. https://arxiv.org/abs/2103.00020 — the symmetric InfoNCE loss over a batch of
(image, caption) pairs, with a learned temperature (``logit_scale``, clamped at ln 100).

Used to pre-train the mini benchmark's tiny CLIP (:mod:`fusion_bench.scripts.build_mini_clip`);
the training loop is generic: any ``CLIPModel`` and any source of batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["BatchFn", "PretrainConfig", "clip_contrastive_loss", "lr_factor", "pretrain_clip"]

BatchFn = Callable[[int], "tuple[torch.Tensor, list[str]]"]
"""``step -> (pixel_values (B, 3, H, W), captions (B,))``: the batch of a training step."""


@dataclass(frozen=True)
class PretrainConfig:
    """Hyperparameters of :func:`pretrain_clip`.

    Attributes:
        num_steps: optimisation steps.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, norms and ``logit_scale``).
        warmup_steps: linear warm-up steps before the cosine decay to 0.
        max_logit_scale: upper clamp of ``logit_scale`` (CLIP: ln 100).
    """

    num_steps: int = 2000
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_logit_scale: float = math.log(100.0)


def clip_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image–text similarity matrix.

    Args:
        image_embeds: (B, D) projected image features (not yet normalised).
        text_embeds: (B, D) projected text features of the matching captions.
        logit_scale: the log temperature (a scalar).

    Returns:
        the mean of the image->text and text->image cross-entropies (a scalar).
    """
    image_embeds, text_embeds = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def lr_factor(step: int, *, num_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``num_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(num_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices get weight decay; vectors (biases, norms) and scalars do not."""
    decay = [p for _, p in sorted(model.named_parameters()) if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in sorted(model.named_parameters()) if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _embed(
    model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected image and text features of a batch, (B, D) each."""
    device = pixel_values.device
    text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    pooled_text = model.text_model(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    ).pooler_output
    pooled_image = model.vision_model(pixel_values=pixel_values).pooler_output  # (B, H)
    return model.visual_projection(pooled_image), model.text_projection(pooled_text)


def pretrain_clip(
    model: nn.Module, tokenizer: Any, batches: BatchFn, config: PretrainConfig, *, device: str | torch.device = "cpu"
) -> list[float]:
    """Train ``model`` (a transformers ``CLIPModel``) contrastively, in place.

    Deterministic given the model's initial weights and ``batches`` (no dropout in CLIP; the
    batches carry all randomness).

    Args:
        model: the CLIP model to train.
        tokenizer: its tokenizer.
        batches: the batch of each step (see :data:`BatchFn`).
        config: hyperparameters.
        device: where to train.

    Returns:
        the loss of every step.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, num_steps=config.num_steps, warmup_steps=config.warmup_steps)
    )
    losses: list[float] = []
    bar = tqdm(range(config.num_steps), desc="pre-training CLIP", leave=False, disable=None)
    for step in bar:
        pixel_values, captions = batches(step)
        image_embeds, text_embeds = _embed(model, tokenizer, pixel_values.to(device), captions)
        loss = clip_contrastive_loss(image_embeds, text_embeds, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, config.max_logit_scale)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses
