"""Captions of generated scenes, for contrastive pre-training of the mini CLIP.

A caption describes most of the scene's attributes in one of many phrasings ("a blurry photo
of a small red ring at the top left on a navy background with grid lines behind it", "the
green digit 7 on spots", ...). Some attributes are left out and some words are
synonyms of the class names the tasks prompt with ("big" for "large", "middle" for
"center"), so the pre-trained model's zero-shot accuracy is real but imperfect.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fusion_bench.data.mini_tasks.scenes import Scene

__all__ = ["CAPTION_KEEP_PROBABILITY", "caption", "caption_vocabulary_corpus"]

CAPTION_KEEP_PROBABILITY = 0.8
"""Chance that each attribute (other than the object itself) is mentioned."""

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SYNONYMS = {
    "large": ("large", "big"),
    "small": ("small", "little"),
    "medium": ("medium", "medium-sized"),
    "center": ("center", "middle"),
    "gray": ("gray", "grey"),
    "spots": ("spots", "a spotted pattern"),
    "checkerboard": ("a checkerboard", "checks"),
    "grid": ("a grid", "grid lines"),
    "zigzag": ("zigzags", "a zigzag pattern"),
    "plain": ("nothing", "a plain surface"),
    "sharp": ("sharp", "clear", "crisp"),
    "blurry": ("blurry", "blurred"),
    "noisy": ("noisy", "grainy"),
    "pixelated": ("pixelated", "blocky"),
}
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "there is", "")
_QUALITY_PREFIXES = ("a {} photo of", "a {} image of", "a {} picture of")


def _word(rng: np.random.Generator, value: str) -> str:
    """``value`` or one of its synonyms."""
    options = _SYNONYMS.get(value, (value,))
    return options[int(rng.integers(len(options)))]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _keep(rng: np.random.Generator) -> bool:
    return bool(rng.random() < CAPTION_KEEP_PROBABILITY)


def _object_phrase(rng: np.random.Generator, scene: Scene) -> str:
    """The foreground, e.g. "a small red ring", "the digit 7", "three blue dots"."""
    color = scene.color if _keep(rng) else ""
    if scene.kind == "dots":
        n = int(scene.count)  # type: ignore[arg-type]
        noun = "dot" if n == 1 else "dots"
        return " ".join(w for w in (_NUMBER_WORDS[n], color, noun) if w)
    if scene.kind == "shape":
        size = _word(rng, scene.size) if _keep(rng) else ""  # type: ignore[arg-type]
        return _with_article(rng, [size, color, str(scene.shape)])
    noun = _pick(rng, ("digit {}", "number {}", "handwritten {}")).format(scene.digit)
    return _with_article(rng, [color, noun])


def _with_article(rng: np.random.Generator, words: list[str]) -> str:
    """The non-empty ``words`` after "the", "a" or "an"."""
    text = " ".join(w for w in words if w)
    article = _pick(rng, ("a", "the"))
    return f"{'an' if article == 'a' and text[0] in 'aeiou' else article} {text}"


def _position_phrase(rng: np.random.Generator, scene: Scene) -> str:
    place = _word(rng, scene.position)  # type: ignore[arg-type]
    return _pick(rng, ("at the {}", "in the {}", "in the {} of the image", "placed at the {}")).format(place)


def _background_phrase(rng: np.random.Generator, scene: Scene) -> str:
    colour = _word(rng, scene.background)
    phrase = _pick(rng, ("on a {} background", "against a {} backdrop", "over {}", "on {}")).format(colour)
    return phrase.replace(" a o", " an o")  # "an olive background"


def _texture_phrase(rng: np.random.Generator, scene: Scene) -> str:
    texture = _word(rng, scene.texture)
    return _pick(rng, ("with {} behind it", "on {}", "with a background of {}", "over {}")).format(texture)


def caption(rng: np.random.Generator, scene: Scene) -> str:
    """A random description of ``scene`` (its object always, other attributes sometimes).

    Args:
        rng: the random generator choosing attributes, order and wording.
        scene: the scene to describe.

    Returns:
        the caption, lower case, ending with a period.
    """
    parts: list[Callable[[np.random.Generator, Scene], str]] = []
    if scene.position is not None and _keep(rng):
        parts.append(_position_phrase)
    if _keep(rng):
        parts.append(_background_phrase)
    if _keep(rng):
        parts.append(_texture_phrase)
    order = rng.permutation(len(parts))
    phrases = [_object_phrase(rng, scene), *(parts[i](rng, scene) for i in order)]
    prefix = _pick(rng, _QUALITY_PREFIXES).format(_word(rng, scene.quality)) if _keep(rng) else _pick(rng, _PREFIXES)
    return " ".join(p for p in (prefix, *phrases) if p) + "."


def caption_vocabulary_corpus(n_captions: int = 2000, seed: int = 0) -> list[str]:
    """Texts for training the tokenizer: every word captions use, in context, and sample captions.

    Args:
        n_captions: how many captions of random scenes to add.
        seed: seed of those scenes and captions.

    Returns:
        the texts.
    """
    from fusion_bench.data.mini_tasks import scenes

    words = [
        *scenes.SHAPES,
        *scenes.COLORS,
        *scenes.BACKGROUNDS,
        *scenes.TEXTURES,
        *scenes.POSITIONS,
        *scenes.SIZES,
        *scenes.QUALITIES,
    ]
    words += [*scenes.DIGITS, *_NUMBER_WORDS, "dot", "dots", "digit", "number", "handwritten"]
    words += [s for synonyms in _SYNONYMS.values() for s in synonyms]
    frames = ["{}", *(f"{p} {{}}." for p in _PREFIXES if p), "on a {} background", "at the {} of the image"]
    rng = np.random.default_rng(seed)
    kinds = [scenes.KINDS[i % len(scenes.KINDS)] for i in range(n_captions)]
    sample = [caption(rng, scenes.sample_scene(rng, kind)) for kind in kinds]
    return [frame.format(w) for w in words for frame in frames] + sample
