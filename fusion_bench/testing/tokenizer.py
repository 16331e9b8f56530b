"""A byte-level BPE tokenizer in CLIP's format, trained locally with ``tokenizers`` (no hub access).

``</w>`` word ends and ``<|startoftext|>``/``<|endoftext|>`` as CLIP's; seeded and deterministic.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

__all__ = ["train_tiny_clip_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
# CLIP's own pre-tokenisation pattern (openai/CLIP simple_tokenizer, as in transformers).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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

    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix=EOW,
        unk_token=EOS if vocab else None,
        fuse_unk=False,
    )
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
        vocab_size=vocab_size + len(fixed),
        min_frequency=2,
        special_tokens=fixed,
        initial_alphabet=alphabet,
        end_of_word_suffix=EOW,
        show_progress=False,
    )
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
