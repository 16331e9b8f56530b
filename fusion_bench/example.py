"""The built-in offline example: a tiny CLIP, fine-tuned variants and tiny datasets.

Configs refer to it as ``${fusion_bench_example:models/clip-tiny}``; the first use builds
it (a few seconds, deterministic) under ``$FUSION_BENCH_EXAMPLE_DIR`` (default
``$FUSION_BENCH_CACHE_DIR/example-v1``, ``FUSION_BENCH_CACHE_DIR`` defaulting to
``~/.cache/fusion_bench``). Nothing is downloaded.

The image-classification example (tiny ViTs and ResNets, :mod:`fusion_bench.testing.tiny_classifiers`)
is ``${fusion_bench_classification_example:models/vit-tiny}`` and is built the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from fusion_bench.utils.paths import cache_root

__all__ = [
    "example_root",
    "example_path",
    "classification_example_root",
    "classification_example_path",
    "openclip_example_path",
    "register_resolvers",
]


def _root(env_var: str, default_name: str) -> Path:
    """``$env_var``, else ``$FUSION_BENCH_CACHE_DIR/default_name`` (cache default ``~/.cache/fusion_bench``)."""
    if env_var in os.environ:
        return Path(os.environ[env_var]).expanduser()
    return cache_root() / default_name


def example_root() -> Path:
    """Where the example lives (see module docstring)."""
    return _root("FUSION_BENCH_EXAMPLE_DIR", "example-v1")


def example_path(relative: str = "") -> str:
    """Absolute path of ``relative`` inside the example, building the example if needed."""
    from fusion_bench.testing.tiny_clip import build_tiny_example

    root = example_root()
    build_tiny_example(root)
    return str(root / relative) if relative else str(root)


def openclip_example_path(relative: str = "") -> str:
    """Absolute path of ``relative`` inside the tiny OpenCLIP example (task_vectors layout, on the
    CLIP example's datasets), a sibling ``<example root>-openclip`` folder, building it if needed."""
    from fusion_bench.testing.tiny_clip import build_tiny_example
    from fusion_bench.testing.tiny_openclip import build_tiny_openclip_example

    clip = build_tiny_example(example_root())
    root = example_root().with_name(example_root().name + "-openclip")
    build_tiny_openclip_example(root, datasets=clip.datasets)
    return str(root / relative) if relative else str(root)


def classification_example_root() -> Path:
    """Where the ViT/ResNet classification example lives: ``$FUSION_BENCH_CLASSIFICATION_EXAMPLE_DIR``
    (default ``$FUSION_BENCH_CACHE_DIR/classification-example-v1``)."""
    return _root("FUSION_BENCH_CLASSIFICATION_EXAMPLE_DIR", "classification-example-v1")


def classification_example_path(relative: str = "") -> str:
    """Absolute path of ``relative`` inside the classification example, building it if needed
    (tiny ViTs and ResNets trained locally for a few epochs; about a minute on two CPU cores)."""
    from fusion_bench.testing.tiny_classifiers import build_tiny_classification_example

    root = classification_example_root()
    build_tiny_classification_example(root)
    return str(root / relative) if relative else str(root)


def register_resolvers() -> None:
    """Register the OmegaConf resolvers used by the shipped configs (idempotent), the offline
    benchmark's ``${fusion_bench_mini:...}`` included."""
    from fusion_bench.data.mini_tasks import register_resolvers as register_mini_resolver

    register_mini_resolver()
    if not OmegaConf.has_resolver("fusion_bench_example"):
        OmegaConf.register_new_resolver("fusion_bench_example", example_path)
    if not OmegaConf.has_resolver("fusion_bench_openclip_example"):
        OmegaConf.register_new_resolver("fusion_bench_openclip_example", openclip_example_path)
    if not OmegaConf.has_resolver("fusion_bench_classification_example"):
        OmegaConf.register_new_resolver("fusion_bench_classification_example", classification_example_path)
