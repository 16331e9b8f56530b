"""Tiny, deterministic CLIP models and image datasets built locally (no hub access).

Used by the tests and by the built-in offline example (:mod:`fusion_bench.example`). One job per module:

* :mod:`~fusion_bench.testing.tokenizer`: :func:`train_tiny_clip_tokenizer`, a byte-level BPE
  tokenizer in CLIP's format (``</w>`` word ends, ``<|startoftext|>``/``<|endoftext|>``);
* :mod:`~fusion_bench.testing.tiny_models`: :func:`build_tiny_clip` (a random tiny ``CLIPModel``
  saved with its ``CLIPProcessor``) and :func:`make_finetuned_variant` (a seeded perturbation of
  the base vision encoder, saved in either checkpoint key layout);
* :mod:`~fusion_bench.testing.tiny_datasets`: :func:`build_tiny_image_dataset`, a ``DatasetDict`` of
  class-dependent generated images;
* :mod:`~fusion_bench.testing.build_cache`: ``build_once``, the atomic build-once folders;
* this module: :func:`build_tiny_example`, all of the above for a few tasks, built once.

Everything is seeded: building twice with the same seed gives bitwise-identical weights,
tokenizers and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from fusion_bench.testing.build_cache import build_once
from fusion_bench.testing.tiny_datasets import GRAYSCALE_TASKS, build_tiny_image_dataset
from fusion_bench.testing.tiny_models import KeyLayout, build_tiny_clip, make_finetuned_variant

__all__ = ["DEFAULT_TASKS", "FORMAT_VERSION", "TinyExample", "build_tiny_example"]

FORMAT_VERSION = 1
DIGITS = [str(i) for i in range(10)]
EUROSAT = [
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
]
DEFAULT_TASKS: dict[str, list[str]] = {"mnist": DIGITS, "eurosat": EUROSAT, "svhn": DIGITS}
TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    'a photo of the number: "{}".',
    "an image of {}.",
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
]
GENERIC_TEXT = ["a photo of a dog.", "a photo of a cat.", "a picture of an object.", "this is a photo of something."]


@dataclass(frozen=True)
class TinyExample:
    """Paths of a built example (see :func:`build_tiny_example`).

    Attributes:
        root: the example's folder.
        base_model: the full tiny CLIP (``root/models/clip-tiny``).
        finetuned: task -> its fine-tuned ``CLIPVisionModel`` (``root/models/clip-tiny_<task>``).
        datasets: task -> its ``DatasetDict`` folder (``root/datasets/<task>``).
        tasks: task -> class names.
    """

    root: Path
    base_model: Path
    finetuned: dict[str, Path]
    datasets: dict[str, Path]
    tasks: dict[str, list[str]]


def _layout(root: Path, tasks: Mapping[str, Sequence[str]]) -> TinyExample:
    """The paths of an example under ``root`` for ``tasks`` (nothing is built)."""
    return TinyExample(
        root=root,
        base_model=root / "models" / "clip-tiny",
        finetuned={t: root / "models" / f"clip-tiny_{t}" for t in tasks},
        datasets={t: root / "datasets" / t for t in tasks},
        tasks={t: list(c) for t, c in tasks.items()},
    )


def _example_corpus(tasks: Mapping[str, Sequence[str]]) -> list[str]:
    """Tokenizer corpus: every class name in every template, task names and generic captions."""
    names = list(dict.fromkeys(n for classes in tasks.values() for n in classes))
    return [t.format(n) for n in names for t in TEMPLATES] + [*tasks] + GENERIC_TEXT


def _build_into(root: Path, tasks: Mapping[str, Sequence[str]], seed: int, layouts: Mapping[str, str]) -> None:
    """Build every part of the example under ``root`` (no marker, no atomicity).

    Args:
        root: the (temporary) folder to build into.
        tasks: task -> class names.
        seed: base seed (model init ``seed``; task ``i``: variant ``seed+1+i``, data ``seed+101+i``).
        layouts: task -> checkpoint key layout of its variant.
    """
    paths = _layout(root, tasks)
    build_tiny_clip(paths.base_model, corpus=_example_corpus(tasks), seed=seed)
    for i, (task, classnames) in enumerate(tasks.items()):
        make_finetuned_variant(
            paths.base_model,
            paths.finetuned[task],
            seed=seed + 1 + i,
            key_layout=layouts[task],  # type: ignore[arg-type]
        )
        mode = "L" if task in GRAYSCALE_TASKS else "RGB"
        build_tiny_image_dataset(paths.datasets[task], classnames=classnames, seed=seed + 101 + i, mode=mode)


def build_tiny_example(
    root: str | Path,
    *,
    tasks: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    key_layouts: Mapping[str, KeyLayout] | None = None,
) -> TinyExample:
    """Build (once) a tiny CLIP, one fine-tuned variant per task and each task's dataset.

    Layout: ``root/models/clip-tiny``, ``root/models/clip-tiny_<task>``,
    ``root/datasets/<task>`` and the marker ``root/.complete`` (format version, seed, tasks,
    layouts), written last. A complete example with the same marker is returned as is; else
    the build goes to a temporary sibling folder renamed into place at the end, so a crash
    never leaves a half-built example.

    Args:
        root: the example's folder.
        tasks: task -> class names; default :data:`DEFAULT_TASKS` (``mnist`` is grayscale).
        seed: base seed of everything.
        key_layouts: task -> key layout of its variant; by default tasks alternate
            ``"prefixed"``, ``"bare"``, ``"prefixed"``, ...

    Returns:
        the example's paths.
    """
    tasks = {t: list(c) for t, c in (tasks or DEFAULT_TASKS).items()}
    layouts = {t: ("prefixed", "bare")[i % 2] for i, t in enumerate(tasks)} | dict(key_layouts or {})
    root = Path(root).expanduser().absolute()
    marker = {"format": FORMAT_VERSION, "seed": seed, "tasks": tasks, "key_layouts": layouts}
    build_once(root, marker, lambda tmp: _build_into(tmp, tasks, seed, layouts))
    return _layout(root, tasks)
