"""Builders of tiny local models and datasets (tests and the offline example).

See :mod:`fusion_bench.testing.tiny_clip`: a locally trained CLIP-format tokenizer, a tiny
random ``CLIPModel``, "fine-tuned" ``CLIPVisionModel`` variants in both checkpoint key
layouts, generated image datasets, and :func:`build_tiny_example` that builds them all once.
"""

from fusion_bench.testing.tiny_clip import (
    DEFAULT_TASKS,
    FORMAT_VERSION,
    KeyLayout,
    TinyExample,
    build_tiny_clip,
    build_tiny_example,
    build_tiny_image_dataset,
    make_finetuned_variant,
    train_tiny_clip_tokenizer,
)

__all__ = [
    "DEFAULT_TASKS",
    "FORMAT_VERSION",
    "KeyLayout",
    "TinyExample",
    "build_tiny_clip",
    "build_tiny_example",
    "build_tiny_image_dataset",
    "make_finetuned_variant",
    "train_tiny_clip_tokenizer",
]
