"""Tiny, deterministic CLIP models and image datasets built locally (no hub access).

Used by the tests and by the built-in offline example (:mod:`fusion_bench.example`):

* :func:`train_tiny_clip_tokenizer` - a byte-level BPE tokenizer in CLIP's format
  (``</w>`` word ends, ``<|startoftext|>``/``<|endoftext|>``), trained with ``tokenizers``;
* :func:`build_tiny_clip` - a random tiny ``CLIPModel`` saved with its ``CLIPProcessor``;
* :func:`make_finetuned_variant` - a "fine-tuned" vision encoder (a seeded perturbation of
  the base), saved as a standalone ``CLIPVisionModel`` in either checkpoint key layout;
* :func:`build_tiny_image_dataset` - a ``DatasetDict`` of class-dependent generated images;
* :func:`build_tiny_example` - all of the above for a few tasks, built once and atomically.

Everything is seeded: building twice with the same seed gives bitwise-identical weights,
tokenizers and images.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, CLIPVisionModel

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

KeyLayout = Literal["prefixed", "bare"]
FORMAT_VERSION = 1
MARKER = ".complete"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
VISION_PREFIX = "vision_model."
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# CLIP's own pre-tokenisation pattern (openai/CLIP simple_tokenizer, as in transformers).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

DIGITS = [str(i) for i in range(10)]
EUROSAT = ["annual crop land", "forest", "brushland or shrubland", "highway or road",
           "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
           "residential buildings or homes or apartments", "river", "lake or sea"]  # fmt: skip
DEFAULT_TASKS: dict[str, list[str]] = {"mnist": DIGITS, "eurosat": EUROSAT, "svhn": DIGITS}
GRAYSCALE_TASKS = ("mnist",)
TEMPLATES = ["a photo of a {}.", "a photo of the {}.", 'a photo of the number: "{}".', "an image of {}.",
             "a centered satellite photo of {}.", "a centered satellite photo of a {}.",
             "a centered satellite photo of the {}."]  # fmt: skip
GENERIC_TEXT = ["a photo of a dog.", "a photo of a cat.", "a picture of an object.", "this is a photo of something."]


# --------------------------------------------------------------------------- tokenizer


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide ``transformers``' and ``datasets``' progress bars inside the block, then restore them.

    Yields:
        nothing; the bars are hidden while the block runs.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    tf_on, ds_on = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if tf_on:
            hf_logging.enable_progress_bar()
        if ds_on:
            datasets.enable_progress_bars()


def _clip_backend(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with CLIP's BPE model, normalizer and pre-tokenizer.

    Args:
        vocab: token -> id; ``None`` for an empty model (to be trained).
        merges: the BPE merges, in order.

    Returns:
        the tokenizer (no post-processor; ``transformers.CLIPTokenizer`` adds its own).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=EOW,
                     unk_token=EOS if vocab else None, fuse_unk=False)  # fmt: skip
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def _byte_alphabet() -> list[str]:
    """The 256 symbols of the byte-level alphabet, sorted (deterministic order)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _train_merges(corpus: Sequence[str], vocab_size: int) -> list[tuple[str, str]]:
    """Learn BPE merges over byte-level symbols with ``tokenizers``' trainer, deterministically.

    The trainer numbers word-final symbols (``x</w>``) in hash-map order, which breaks ties
    between equally frequent pairs differently from run to run; registering every word-final
    symbol up front (as special tokens) fixes their ids and so makes the merges reproducible.

    Args:
        corpus: training texts.
        vocab_size: base alphabet (256) plus the most merges to learn.

    Returns:
        the merges, in the order learned.
    """
    from tokenizers import trainers

    alphabet = _byte_alphabet()
    fixed = [BOS, EOS, *(c + EOW for c in alphabet)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(fixed), min_frequency=2, special_tokens=fixed, initial_alphabet=alphabet,
        end_of_word_suffix=EOW, show_progress=False,
    )  # fmt: skip
    tokenizer = _clip_backend()
    tokenizer.train_from_iterator(list(corpus), trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _write_vocab_and_merges(out_dir: Path, merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Write ``vocab.json`` and ``merges.txt`` in openai/CLIP's layout.

    Ids: the 256 byte symbols, their 256 word-final forms, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (CLIP's order).

    Args:
        out_dir: the folder to write to (created if needed).
        merges: the BPE merges, in order.

    Returns:
        the vocabulary written.
    """
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + EOW for c in alphabet), *(a + b for a, b in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab


def _check_tokenizer(tokenizer: CLIPTokenizer, corpus: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` round-trips a caption and knows every corpus text.

    Args:
        tokenizer: the tokenizer to check.
        corpus: texts that must encode without unknown tokens (besides the added BOS/EOS).
    """
    caption = "a photo of a dog."
    ids = tokenizer(caption)["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"tokenizer does not wrap {caption!r} in BOS/EOS: {ids}")
    if tokenizer.decode(ids, skip_special_tokens=True).replace(" .", ".") != caption:
        raise ValueError(f"tokenizer does not round-trip {caption!r}")
    for text in corpus:
        inner = tokenizer(text, add_special_tokens=False)["input_ids"]
        if text.strip() and (not inner or tokenizer.unk_token_id in inner):
            raise ValueError(f"tokenizer maps part of {text!r} to the unknown token")


def train_tiny_clip_tokenizer(out_dir: str | Path, corpus: Sequence[str], *, vocab_size: int = 512) -> CLIPTokenizer:
    """Train a byte-level BPE tokenizer in CLIP's format on ``corpus`` and save it to ``out_dir``.

    Pre-tokenisation and normalisation are CLIP's (NFC, whitespace folding, lower-casing,
    CLIP's split pattern, byte-level symbols), so any text is encodable. ``out_dir`` gets
    ``vocab.json``/``merges.txt`` (``#version: 0.2``) plus the files of ``save_pretrained``, so
    ``AutoTokenizer``/``CLIPProcessor.from_pretrained(out_dir)`` load it.

    Args:
        out_dir: where the tokenizer files go (created if needed).
        corpus: training texts (class names in prompts, generic words).
        vocab_size: size of the learned vocabulary: the 256 byte symbols plus at most
            ``vocab_size - 256`` merges (fewer when the corpus runs out of pairs seen twice).
            The 256 word-final byte symbols and the 2 special tokens come on top.

    Returns:
        the tokenizer, loaded back from ``out_dir`` with ``transformers.CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    out_dir = Path(out_dir)
    _write_vocab_and_merges(out_dir, _train_merges(corpus, vocab_size))
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=77)
    _check_tokenizer(tokenizer, corpus)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# --------------------------------------------------------------------------- models


def _clip_config(tokenizer: CLIPTokenizer, image_size: int, patch_size: int, projection_dim: int, **layers: int) -> Any:
    """A ``CLIPConfig`` whose text tower matches ``tokenizer`` (vocab size, special ids).

    Args:
        tokenizer: the model's tokenizer.
        image_size: input resolution of the vision tower.
        patch_size: ViT patch size.
        projection_dim: size of the joint embedding.
        **layers: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads`` (shared by both towers).

    Returns:
        the ``transformers.CLIPConfig``.
    """
    from transformers import CLIPConfig

    text = dict(layers, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(layers, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _image_processor(image_size: int) -> Any:
    """A ``CLIPImageProcessor`` resizing/cropping to ``image_size`` with CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def build_tiny_clip(
    out_dir: str | Path,
    *,
    corpus: Sequence[str],
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 16,
) -> Path:
    """Save a randomly initialised tiny ``CLIPModel`` and its ``CLIPProcessor`` to ``out_dir``.

    Args:
        out_dir: the model folder (created if needed).
        corpus: texts to train the tokenizer on (see :func:`train_tiny_clip_tokenizer`).
        seed: seed of the weight initialisation (the global torch RNG state is restored).
        hidden_size: width of both towers.
        intermediate_size: MLP width of both towers.
        num_layers: transformer layers per tower.
        num_heads: attention heads per layer.
        image_size: input resolution (the image processor resizes and crops to it).
        patch_size: ViT patch size.
        projection_dim: size of the joint image-text embedding.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    tokenizer = train_tiny_clip_tokenizer(out_dir, corpus)
    config = _clip_config(tokenizer, image_size, patch_size, projection_dim, hidden_size=hidden_size,
                          intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = _image_processor(image_size)
    with _quiet_progress():
        model.save_pretrained(str(out_dir))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))
    image_processor.save_pretrained(str(out_dir))  # also the standalone preprocessor_config.json
    return out_dir


def _load_base_vision(base_dir: str | Path) -> CLIPVisionModel:
    """The vision tower of the CLIP model in ``base_dir`` as a ``CLIPVisionModel``.

    Goes through ``CLIPModel`` so the text tower's weights are not reported as unexpected.

    Args:
        base_dir: a full CLIP checkpoint folder.

    Returns:
        the vision model (eval mode, float32).
    """
    from transformers import CLIPModel, CLIPVisionModel

    with _quiet_progress():
        clip = CLIPModel.from_pretrained(str(base_dir))
    if isinstance(clip.vision_model, CLIPVisionModel):  # transformers >= 5
        vision = clip.vision_model
    else:  # pragma: no cover - transformers 4: wrap the inner CLIPVisionTransformer
        vision = CLIPVisionModel(clip.config.vision_config)
        vision.vision_model = clip.vision_model
    vision.config.architectures = ["CLIPVisionModel"]
    return vision.eval()


def _bare_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with bare keys (``embeddings.*``, ``encoder.*``), contiguous, on CPU."""
    state = model.state_dict()
    return {k.removeprefix(VISION_PREFIX): v.detach().cpu().contiguous() for k, v in state.items()}


def _perturb_(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add seeded noise of std ``scale * (param std + 1e-3)`` to every float parameter, in place.

    Args:
        model: the model to perturb.
        seed: seed of the noise (a private generator; the global RNG is untouched).
        scale: noise size relative to each parameter's spread.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.is_floating_point():
                spread = param.float().std().nan_to_num(0.0) if param.numel() > 1 else torch.tensor(0.0)
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_((noise * scale * (spread + 1e-3)).to(param.dtype))


def make_finetuned_variant(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    scale: float = 0.02,
    key_layout: KeyLayout = "prefixed",
) -> Path:
    """Save a seeded perturbation of the base CLIP's vision tower as a ``CLIPVisionModel``.

    ``out_dir`` gets ``config.json`` (``model_type`` ``clip_vision_model``),
    ``model.safetensors`` and the base's ``preprocessor_config.json``.

    Args:
        base_dir: the full CLIP checkpoint (see :func:`build_tiny_clip`).
        out_dir: the variant's folder (created if needed).
        seed: seed of the perturbation.
        scale: noise std relative to each parameter's std (plus ``1e-3``).
        key_layout: ``"prefixed"`` writes ``vision_model.*`` keys (the hub's / transformers 4
            layout, what ``save_pretrained`` writes); ``"bare"`` writes ``embeddings.*``,
            ``encoder.*``, ... (transformers 5 ``state_dict`` names).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    if key_layout not in ("prefixed", "bare"):
        raise ValueError(f"key_layout must be 'prefixed' or 'bare', got {key_layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load_base_vision(base_dir)
    _perturb_(model, seed, scale)
    state = _bare_state_dict(model)
    if key_layout == "prefixed":
        state = {VISION_PREFIX + k: v for k, v in state.items()}
    model.config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    CLIPImageProcessor.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    return out_dir


# --------------------------------------------------------------------------- datasets


def _class_image(rng: np.random.Generator, label: int, n_classes: int, size: int, mode: str) -> PILImage:
    """One generated image of class ``label``: its own stripes, tint and bright square, plus noise.

    Stripe angle and frequency and the square's position depend on the class (so they survive
    conversion to grayscale); the tint adds a colour cue in RGB.

    Args:
        rng: the random generator (noise and a small random shift of the square).
        label: the class index.
        n_classes: number of classes.
        size: image side in pixels.
        mode: PIL mode of the result (``"RGB"``, ``"L"``, ...).

    Returns:
        the PIL image.
    """
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / max(n_classes, 1)
    phase = (2 + label % 4) * (xx * np.cos(angle) + yy * np.sin(angle))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    tint = 0.5 + 0.35 * np.array([np.sin(label + 0.5), np.cos(1.7 * label), np.sin(2.3 * label + 1.0)])
    img = 0.15 + 0.6 * stripes[..., None] * tint[None, None, :]
    q = max(size // 4, 1)
    row, col = (label * 3 % 4) * q, (label % 4) * q
    dr, dc = rng.integers(-1, 2, size=2)
    img[max(row + dr, 0) : row + dr + q, max(col + dc, 0) : col + dc + q] = 1.0
    img = img + rng.normal(0.0, 0.08, img.shape)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), "RGB").convert(mode)


def build_tiny_image_dataset(
    out_dir: str | Path,
    *,
    classnames: Sequence[str],
    n_train_per_class: int = 4,
    n_test_per_class: int = 4,
    seed: int = 0,
    image_size: int = 32,
    mode: str = "RGB",
) -> Path:
    """Save a ``datasets.DatasetDict`` of generated, class-dependent images with ``save_to_disk``.

    Args:
        out_dir: the dataset folder.
        classnames: class names (``label`` is a ``ClassLabel`` over them).
        n_train_per_class: images per class in ``train``.
        n_test_per_class: images per class in ``test``.
        seed: seed of the noise.
        image_size: image side in pixels.
        mode: PIL mode of the images (``"L"`` for grayscale).

    Returns:
        ``out_dir`` as a ``Path``; reload it with ``datasets.load_from_disk``.
    """
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))})
    splits = {}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = [label for _ in range(per_class) for label in range(len(classnames))]
        images = [_class_image(rng, label, len(classnames), image_size, mode) for label in labels]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    with _quiet_progress():
        datasets.DatasetDict(splits).save_to_disk(str(out_dir))
    return Path(out_dir)


# --------------------------------------------------------------------------- the example


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


def _read_marker(root: Path) -> dict[str, Any] | None:
    """The content of ``root/.complete``, or ``None`` when absent or unreadable."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


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
            paths.base_model, paths.finetuned[task], seed=seed + 1 + i, key_layout=layouts[task]  # type: ignore[arg-type]
        )
        mode = "L" if task in GRAYSCALE_TASKS else "RGB"
        build_tiny_image_dataset(paths.datasets[task], classnames=classnames, seed=seed + 101 + i, mode=mode)


def _move_into_place(tmp: Path, root: Path, marker: dict[str, Any]) -> None:
    """Rename the built ``tmp`` to ``root``, replacing a stale example; tolerate a concurrent winner.

    Args:
        tmp: the complete build (a sibling of ``root``).
        root: the destination; must be absent, empty or hold an example (``.complete``).
        marker: the marker of the build, to recognise a concurrent identical build.
    """
    if root.exists() and any(root.iterdir()):
        if _read_marker(root) is None:
            raise FileExistsError(f"{root} exists, is not empty and holds no complete example; not replacing it")
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        if _read_marker(root) != marker:  # not a concurrent build of the same example
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(root: Path, marker: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build a fixture folder once: reuse ``root`` if its marker equals ``marker``, else ``build``
    into a temporary sibling, write the marker last and rename the result into place.

    Args:
        root: the destination folder (absolute).
        marker: what identifies a complete build (format version, seed, contents).
        build: fills the folder it is given.
    """
    if _read_marker(root) == marker:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build.", dir=root.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(tmp, root, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
