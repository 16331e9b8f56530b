"""Builders of tiny local models and datasets (tests and the offline example).

See :mod:`fusion_bench.testing.tiny_clip`: a locally trained CLIP-format tokenizer, a tiny
random ``CLIPModel``, "fine-tuned" ``CLIPVisionModel`` variants in both checkpoint key
layouts, generated image datasets, and :func:`build_tiny_example` that builds them all once.
"""

from fusion_bench.testing.tiny_clip import DEFAULT_TASKS, FORMAT_VERSION, TinyExample, build_tiny_example
from fusion_bench.testing.tiny_datasets import build_tiny_image_dataset
from fusion_bench.testing.tiny_models import KeyLayout, build_tiny_clip, make_finetuned_variant
from fusion_bench.testing.tokenizer import train_tiny_clip_tokenizer

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
