"""Image–caption batches for contrastive pre-training of the mini CLIP.

A batch is made of groups of scenes that share some attributes (each attribute is shared
within a group with probability :data:`SHARE_PROBABILITY`). In a batch of independent scenes
the two most salient attributes (object and background colour) already tell almost every
caption apart, and the model would learn little else; inside a group the captions differ
only in the attributes that vary, so every attribute has to be seen. Every batch is a pure
function of ``(seed, step)``: training is reproducible and resumable at any step.
"""

from __future__ import annotations

import numpy as np

from fusion_bench.data.mini_tasks.captions import caption
from fusion_bench.data.mini_tasks.scenes import KINDS, Kind, render_scene, sample_scene
from fusion_bench.data.mini_tasks import scenes

__all__ = ["KIND_WEIGHTS", "SHARE_PROBABILITY", "pretraining_batch"]

KIND_WEIGHTS = {"shape": 0.5, "digit": 0.25, "dots": 0.25}
"""How often each scene kind appears in pre-training."""
SHARE_PROBABILITY = 0.5
"""Chance that an attribute is shared by all scenes of a group."""

_SHARABLE = {
    "color": tuple(scenes.COLORS),
    "background": tuple(scenes.BACKGROUNDS),
    "texture": scenes.TEXTURES,
    "quality": scenes.QUALITIES,
    "shape": scenes.SHAPES,
    "position": scenes.POSITIONS,
    "size": scenes.SIZES,
}
_APPLIES = {"shape": ("shape",), "position": ("shape",), "size": ("shape",)}


def _draw_kind(rng: np.random.Generator) -> Kind:
    return KINDS[int(rng.choice(len(KINDS), p=[KIND_WEIGHTS[k] for k in KINDS]))]


def _group(rng: np.random.Generator, size: int) -> list[scenes.Scene]:
    """``size`` scenes sharing a random subset of attributes (and maybe their kind)."""
    shared = {a: v[int(rng.integers(len(v)))] for a, v in _SHARABLE.items() if rng.random() < SHARE_PROBABILITY}
    group_kind = _draw_kind(rng) if rng.random() < SHARE_PROBABILITY else None
    members = []
    for _ in range(size):
        kind = group_kind or _draw_kind(rng)
        fixed = {a: v for a, v in shared.items() if kind in _APPLIES.get(a, KINDS)}
        members.append(sample_scene(rng, kind, "train", **fixed))
    return members


def pretraining_batch(
    seed: int, step: int, *, batch_size: int = 128, group_size: int = 8
) -> tuple[np.ndarray, list[str]]:
    """The images and captions of pre-training step ``step``.

    Args:
        seed: the run's seed.
        step: the step (batches of different steps are independent).
        batch_size: scenes per batch (a multiple of ``group_size``).
        group_size: scenes per group of shared attributes.

    Returns:
        ``(images (B, 32, 32, 3) uint8, captions (B,))``; digits come from the training writers only.
    """
    if batch_size % group_size:
        raise ValueError(f"batch_size {batch_size} is not a multiple of group_size {group_size}")
    rng = np.random.default_rng([seed, step])
    batch = [s for _ in range(batch_size // group_size) for s in _group(rng, group_size)]
    images = np.stack([render_scene(rng, s, "train") for s in batch])
    return images, [caption(rng, s) for s in batch]
