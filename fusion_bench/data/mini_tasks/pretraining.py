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

__all__ = ["FOCUS_ATTRIBUTES", "FOCUS_PROBABILITY", "KIND_WEIGHTS", "SHARE_PROBABILITY", "pretraining_batch"]

KIND_WEIGHTS = {"shape": 0.5, "digit": 0.25, "dots": 0.25}
"""How often each scene kind appears in pre-training."""
SHARE_PROBABILITY = 0.5
"""Chance that an attribute is shared by all scenes of a group."""
FOCUS_PROBABILITY = 0.5
"""Chance that a group is a focus group (one attribute varies, all others shared)."""
FOCUS_ATTRIBUTES = ("shape", "color", "texture", "background", "size", "quality", "digit", "count")
"""The attributes a focus group may vary: the eight tasks' labels."""
_FOCUS_KIND: dict[str, Kind] = {"shape": "shape", "size": "shape", "digit": "digit", "count": "dots"}

_SHARABLE = {
    "color": tuple(scenes.COLORS), "background": tuple(scenes.BACKGROUNDS), "texture": scenes.TEXTURES,
    "quality": scenes.QUALITIES, "shape": scenes.SHAPES, "position": scenes.POSITIONS, "size": scenes.SIZES,
}  # fmt: skip
_APPLIES = {"shape": ("shape",), "position": ("shape",), "size": ("shape",)}


def _draw_kind(rng: np.random.Generator) -> Kind:
    return KINDS[int(rng.choice(len(KINDS), p=[KIND_WEIGHTS[k] for k in KINDS]))]


def _group(rng: np.random.Generator, size: int) -> list[scenes.Scene]:
    """``size`` scenes sharing a random subset of attributes (and maybe their kind).

    With probability :data:`FOCUS_PROBABILITY` the group is a *focus* group instead: one attribute
    (:data:`FOCUS_ATTRIBUTES`) varies and every other one is shared, so the captions differ only in
    that attribute's words. Without such hard negatives the two most salient attributes tell the
    captions apart and the text tower never learns to separate digits, shapes or counts.
    """
    if rng.random() < FOCUS_PROBABILITY:
        focus = FOCUS_ATTRIBUTES[int(rng.integers(len(FOCUS_ATTRIBUTES)))]
        shared = {a: v[int(rng.integers(len(v)))] for a, v in _SHARABLE.items() if a != focus}
        group_kind = _FOCUS_KIND.get(focus) or _draw_kind(rng)
        return _members(rng, size, shared, group_kind)
    shared = {a: v[int(rng.integers(len(v)))] for a, v in _SHARABLE.items() if rng.random() < SHARE_PROBABILITY}
    group_kind = _draw_kind(rng) if rng.random() < SHARE_PROBABILITY else None
    return _members(rng, size, shared, group_kind)


def _members(rng: np.random.Generator, size: int, shared: dict, group_kind: Kind | None) -> list[scenes.Scene]:
    members = []
    for _ in range(size):
        kind = group_kind or _draw_kind(rng)
        fixed = {a: v for a, v in shared.items() if kind in _APPLIES.get(a, KINDS)}
        members.append(sample_scene(rng, kind, "train", **fixed))
    return members


def pretraining_batch(seed: int, step: int, *, batch_size: int = 128, group_size: int = 8) -> tuple[np.ndarray, list[str]]:
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
