"""Generated 32×32 RGB scenes with several attributes each (the mini benchmark's images).

A scene is a background (a colour with a texture) and one of three kinds of foreground:

* ``shape``: one coloured geometric shape of some size at one of 9 grid positions;
* ``digit``: one large handwritten digit (scikit-learn's ``load_digits``, real data) in a
  colour, near the centre;
* ``dots``: one to six small dots of one colour scattered over the image.

Every scene is then rendered in one of four qualities (sharp, blurry, noisy, pixelated).

Every task of the benchmark asks about a different attribute of the same kind of image
(see :mod:`fusion_bench.data.mini_tasks.tasks`), so features useful for one task are noise
for another. Rendering is pure numpy (anti-aliased by 2× supersampling) driven by a seeded
``numpy.random.Generator``: the same generator state gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "COUNTS",
    "DIGITS",
    "IMAGE_SIZE",
    "KINDS",
    "POSITIONS",
    "QUALITIES",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "Scene",
    "digit_pool",
    "render_scene",
    "sample_scene",
]

IMAGE_SIZE = 32
SUPERSAMPLE = 2
Kind = Literal["shape", "digit", "dots"]
KINDS: tuple[Kind, ...] = ("shape", "digit", "dots")

SHAPES = ("circle", "square", "triangle", "diamond", "plus", "cross", "ring", "frame")
COLORS = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.50, 0.75),
}
BACKGROUNDS = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "navy": (0.05, 0.08, 0.40),
    "maroon": (0.40, 0.05, 0.08),
    "dark green": (0.05, 0.30, 0.10),
    "olive": (0.45, 0.45, 0.10),
    "teal": (0.05, 0.40, 0.40),
}
TEXTURES = (
    "plain",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "spots",
    "grid",
    "zigzag",
)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "medium", "large")
QUALITIES = ("sharp", "blurry", "noisy", "pixelated")
DIGITS = tuple(str(d) for d in range(10))
COUNTS = (1, 2, 3, 4, 5, 6)

_GRID = (8.0, 16.0, 24.0)  # pixel centres of the 3×3 position grid
_RADIUS = {"small": 4.5, "medium": 6.0, "large": 7.5}  # half-size of a shape in pixels
_DIGIT_SIDE = (18, 24)  # range of a digit's side in pixels
_DIGIT_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Scene:
    """The attributes of one image (``None`` where the kind has no such attribute).

    Attributes:
        kind: ``"shape"``, ``"digit"`` or ``"dots"``.
        color: foreground colour (a key of :data:`COLORS`).
        background: background colour (a key of :data:`BACKGROUNDS`).
        texture: background pattern (one of :data:`TEXTURES`).
        quality: how the image is rendered (one of :data:`QUALITIES`).
        shape: the shape (kind ``shape``).
        position: grid position (kind ``shape``).
        size: shape size (kind ``shape``).
        digit: the digit's class (kind ``digit``).
        digit_index: which ``load_digits`` image draws it (index into its split's pool).
        count: number of dots (kind ``dots``).
    """

    kind: Kind
    color: str
    background: str
    texture: str
    quality: str
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    digit: str | None = None
    digit_index: int | None = None
    count: int | None = None


# --------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as (images (N, 8, 8) in [0, 1], labels, is_test), seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency of the mini benchmark
        raise ImportError("the mini benchmark's digit images need scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    order = np.random.default_rng(1797).permutation(len(digits.target))
    is_test = np.zeros(len(order), dtype=bool)
    is_test[order[: int(len(order) * _DIGIT_TEST_FRACTION)]] = True
    return (digits.images / 16.0).astype(np.float64), digits.target.astype(np.int64), is_test


def digit_pool(split: str, digit: int) -> np.ndarray:
    """The ``load_digits`` images of class ``digit`` reserved for ``split``.

    About 30% of the writers' digits are held out for ``"test"``; ``"train"`` (also used for
    pre-training) never sees them.

    Args:
        split: ``"train"`` or ``"test"``.
        digit: the class, 0-9.

    Returns:
        (n, 8, 8) float64 intensities in [0, 1].
    """
    images, labels, is_test = _digit_split()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return images[(labels == digit) & (is_test == (split == "test"))]


# --------------------------------------------------------------------------- sampling


def _choice(rng: np.random.Generator, options: tuple | dict) -> str:
    """A uniformly drawn element (or key) of ``options``."""
    keys = list(options)
    return keys[int(rng.integers(len(keys)))]


def sample_scene(rng: np.random.Generator, kind: Kind, split: str = "train", **fixed: object) -> Scene:
    """Draw a scene of ``kind`` with uniform attributes, some of them fixed by the caller.

    Args:
        rng: the random generator.
        kind: ``"shape"``, ``"digit"`` or ``"dots"``.
        split: which pool of handwritten digits to draw from (``"train"`` or ``"test"``).
        **fixed: attribute values to use instead of drawing them (e.g. ``shape="ring"``).

    Returns:
        the scene.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; kinds: {', '.join(KINDS)}")
    attrs: dict[str, object] = {
        "color": _choice(rng, COLORS),
        "background": _choice(rng, BACKGROUNDS),
        "texture": _choice(rng, TEXTURES),
        "quality": _choice(rng, QUALITIES),
    }
    if kind == "shape":
        attrs.update(shape=_choice(rng, SHAPES), position=_choice(rng, POSITIONS), size=_choice(rng, SIZES))
    elif kind == "digit":
        attrs.update(digit=_choice(rng, DIGITS))
    else:
        attrs.update(count=int(COUNTS[int(rng.integers(len(COUNTS)))]))
    attrs.update(fixed)
    if kind == "digit":
        attrs["digit_index"] = int(rng.integers(len(digit_pool(split, int(attrs["digit"])))))  # type: ignore[arg-type]
    return Scene(kind=kind, **attrs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def _fine_grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the supersampled canvas, (S, S) each, in output pixels."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords, indexing="xy")


def _downsample(mask: np.ndarray) -> np.ndarray:
    """Average ``SUPERSAMPLE``×``SUPERSAMPLE`` blocks: a (32, 32) coverage in [0, 1]."""
    n, s = IMAGE_SIZE, SUPERSAMPLE
    return mask.reshape(n, s, n, s).mean(axis=(1, 3))


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether each point (``u``, ``v``; shape-normalised, y down) lies inside ``shape``."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "triangle":
        return (v <= 0.8) & (v >= 2.0 * au - 1.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "plus":
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "cross":
        return _shape_inside("plus", (u + v) / np.sqrt(2.0), (u - v) / np.sqrt(2.0))
    if shape == "ring":
        return (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2)
    if shape == "frame":
        return (np.maximum(au, av) <= 0.9) & (np.maximum(au, av) >= 0.5)
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _grid_centre(rng: np.random.Generator, position: str) -> tuple[float, float]:
    """Pixel centre (x, y) of ``position`` with a ±1 px jitter."""
    index = POSITIONS.index(position)
    jitter = rng.uniform(-1.0, 1.0, size=2)
    return _GRID[index % 3] + jitter[0], _GRID[index // 3] + jitter[1]


def _shape_alpha(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Coverage (32, 32) of the scene's shape, slightly rotated and resized at random."""
    xx, yy = _fine_grid()
    cx, cy = _grid_centre(rng, scene.position)  # type: ignore[arg-type]
    radius = _RADIUS[scene.size] * rng.uniform(0.92, 1.08)  # type: ignore[index]
    angle = rng.uniform(-0.17, 0.17)  # about ±10 degrees
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    return _downsample(_shape_inside(scene.shape, u, v).astype(np.float64))  # type: ignore[arg-type]


def _digit_alpha(rng: np.random.Generator, scene: Scene, split: str) -> np.ndarray:
    """Coverage (32, 32) of the scene's handwritten digit, resized and placed near the centre."""
    from PIL import Image

    glyph = digit_pool(split, int(scene.digit))[scene.digit_index]  # type: ignore[arg-type,index]
    side = int(rng.integers(_DIGIT_SIDE[0], _DIGIT_SIDE[1] + 1))
    big = np.asarray(Image.fromarray(glyph.astype(np.float32), "F").resize((side, side), Image.BILINEAR))
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-3.0, 3.0, size=2)
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + side, IMAGE_SIZE), min(left + side, IMAGE_SIZE)
    alpha[t0:t1, l0:l1] = big[t0 - top : t1 - top, l0 - left : l1 - left]
    return np.clip(alpha * 1.4, 0.0, 1.0)


def _dots_alpha(rng: np.random.Generator, count: int) -> np.ndarray:
    """Coverage (32, 32) of ``count`` dots (radius 1.8 px) at least 6 px apart."""
    xx, yy = _fine_grid()
    centres: list[np.ndarray] = []
    while len(centres) < count:
        c = rng.uniform(3.0, IMAGE_SIZE - 3.0, size=2)
        if all(np.hypot(*(c - o)) >= 6.0 for o in centres):
            centres.append(c)
    inside = np.zeros_like(xx, dtype=bool)
    for cx, cy in centres:
        inside |= (xx - cx) ** 2 + (yy - cy) ** 2 <= 1.8**2
    return _downsample(inside.astype(np.float64))


def _texture(rng: np.random.Generator, texture: str) -> np.ndarray:
    """Pattern intensity (32, 32) in [0, 1] with a random period and phase (0 = plain)."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    period, phase = rng.uniform(4.0, 7.0), rng.uniform(0.0, 1.0)

    def wave(t: np.ndarray) -> np.ndarray:  # square wave of period `period`
        return (np.mod(t / period + phase, 1.0) < 0.5).astype(np.float64)

    if texture == "plain":
        return np.zeros_like(xx)
    if texture == "horizontal stripes":
        return wave(yy)
    if texture == "vertical stripes":
        return wave(xx)
    if texture == "diagonal stripes":
        return wave((xx + yy * rng.choice([-1.0, 1.0])) / np.sqrt(2.0))
    if texture == "checkerboard":
        return np.abs(wave(xx) - wave(yy))
    if texture == "spots":
        fx, fy = np.mod(xx / period + phase, 1.0) - 0.5, np.mod(yy / period + phase, 1.0) - 0.5
        return (fx**2 + fy**2 <= 0.28**2).astype(np.float64)
    if texture == "grid":
        return ((np.mod(xx + phase * period, period) < 1.0) | (np.mod(yy + phase * period, period) < 1.0)).astype(
            np.float64
        )
    if texture == "zigzag":
        tri = np.abs(np.mod(xx / period, 1.0) - 0.5) * period
        return wave(yy + tri)
    raise ValueError(f"unknown texture {texture!r}; textures: {', '.join(TEXTURES)}")


def _jittered(rng: np.random.Generator, rgb: tuple[float, float, float], spread: float) -> np.ndarray:
    """``rgb`` with per-channel jitter ``±spread`` and a brightness factor in [0.8, 1.08]."""
    return np.clip(np.asarray(rgb) * rng.uniform(0.8, 1.08) + rng.uniform(-spread, spread, 3), 0.0, 1.0)


def _background(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """The (32, 32, 3) background: its colour modulated by its texture."""
    base = _jittered(rng, BACKGROUNDS[scene.background], 0.06)
    ink = base + (0.25 if base.mean() < 0.5 else -0.25)  # the pattern: lighter on dark, darker on light
    strength = rng.uniform(0.6, 1.0)
    pattern = _texture(rng, scene.texture)[..., None]  # (32, 32, 1)
    return base + strength * pattern * (ink - base)


def render_scene(rng: np.random.Generator, scene: Scene, split: str = "train") -> np.ndarray:
    """Render ``scene`` as a (32, 32, 3) ``uint8`` RGB image.

    Args:
        rng: the random generator for placement jitter, pattern phase and pixel noise.
        scene: what to draw.
        split: the digit pool the scene's ``digit_index`` refers to.

    Returns:
        the image array.
    """
    img = _background(rng, scene)
    if scene.kind == "shape":
        alpha = _shape_alpha(rng, scene)
    elif scene.kind == "digit":
        alpha = _digit_alpha(rng, scene, split)
    else:
        alpha = _dots_alpha(rng, int(scene.count))  # type: ignore[arg-type]
    colour = _jittered(rng, COLORS[scene.color], 0.1)
    img = img * (1.0 - alpha[..., None]) + colour * alpha[..., None]  # (32, 32, 3)
    img = _degrade(rng, img, scene.quality)
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (32, 32, 3) image (edges replicated)."""
    taps = np.arange(-3, 4)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(3, 3) if a == axis else (0, 0) for a in range(3)], mode="edge")
        img = sum(w * np.take(padded, np.arange(i, i + IMAGE_SIZE), axis=axis) for i, w in enumerate(kernel))
    return img


def _degrade(rng: np.random.Generator, img: np.ndarray, quality: str) -> np.ndarray:
    """Apply ``quality`` to a (32, 32, 3) image in [0, 1]; every image also gets faint noise."""
    if quality == "blurry":
        img = _blur(img, rng.uniform(0.8, 1.1))
    elif quality == "pixelated":
        n = IMAGE_SIZE // 2  # 2×2 blocks
        coarse = img.reshape(n, 2, n, 2, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    elif quality not in ("sharp", "noisy"):
        raise ValueError(f"unknown quality {quality!r}; qualities: {', '.join(QUALITIES)}")
    sigma = rng.uniform(0.08, 0.12) if quality == "noisy" else 0.02
    return img + rng.normal(0.0, sigma, img.shape)
