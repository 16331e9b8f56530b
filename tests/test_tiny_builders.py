"""Tests of the tiny local builders (:mod:`fusion_bench.testing`): tokenizer, models, datasets."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion_bench.testing import (
    DEFAULT_TASKS,
    TinyExample,
    build_tiny_clip,
    build_tiny_example,
    build_tiny_image_dataset,
    make_finetuned_variant,
    train_tiny_clip_tokenizer,
)
from fusion_bench.testing import tiny_clip, tiny_models

SMALL_CORPUS = ["a photo of a cat.", "a photo of a dog.", 'a photo of the number: "7".', "lake or sea"] * 2


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> TinyExample:
    """The default example, built once for the module."""
    return build_tiny_example(tmp_path_factory.mktemp("tiny") / "example")


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP on a small corpus (seed 0)."""
    return build_tiny_clip(tmp_path_factory.mktemp("small") / "clip", corpus=SMALL_CORPUS, seed=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``."""
    return load_file(str(path / "model.safetensors"))


def _raw_keys(path: Path) -> list[str]:
    """The tensor names stored in ``path/model.safetensors``."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_with_auto_and_knows_every_classname(example: TinyExample) -> None:
    from transformers import AutoTokenizer, CLIPConfig, CLIPTokenizer

    tok = AutoTokenizer.from_pretrained(example.base_model)
    assert isinstance(tok, CLIPTokenizer)
    assert (example.base_model / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
    vocab = json.loads((example.base_model / "vocab.json").read_text())
    assert {"<|startoftext|>", "<|endoftext|>"} <= set(vocab) and len(vocab) == len(tok)
    for classnames in example.tasks.values():
        for name in classnames:
            ids = tok(name, add_special_tokens=False)["input_ids"]
            assert ids and tok.unk_token_id not in ids, name
    ids = tok("a photo of a dog.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|startoftext|>", "a</w>", "photo</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a dog ."
    text = CLIPConfig.from_pretrained(example.base_model).text_config
    assert (text.vocab_size, text.bos_token_id, text.eos_token_id) == (len(tok), tok.bos_token_id, tok.eos_token_id)
    assert text.pad_token_id == tok.pad_token_id and text.max_position_embeddings == 77 == tok.model_max_length


def test_tokenizer_encodes_any_character_and_is_deterministic(tmp_path: Path) -> None:
    corpus = [*SMALL_CORPUS, "Café Ünïcode straße 東京 ½ — emoji 🙂"]
    tok = train_tiny_clip_tokenizer(tmp_path / "a", corpus, vocab_size=300)
    train_tiny_clip_tokenizer(tmp_path / "b", corpus, vocab_size=300)
    for text in corpus:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(tok) <= 300 + 256 + 2
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_clip_tokenizer(tmp_path / "c", corpus, vocab_size=100)


# --------------------------------------------------------------------------- models


def test_models_and_processor_load_without_missing_keys(example: TinyExample) -> None:
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    clip, info = CLIPModel.from_pretrained(example.base_model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    vision, info = CLIPVisionModel.from_pretrained(example.base_model, output_loading_info=True)
    assert not info["missing_keys"]
    for expert in example.finetuned.values():
        _, info = CLIPVisionModel.from_pretrained(expert, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert json.loads((expert / "config.json").read_text())["model_type"] == "clip_vision_model"
        assert (expert / "preprocessor_config.json").is_file()
    processor = CLIPProcessor.from_pretrained(example.base_model)
    images = [Image.new("RGB", (40, 50), (i * 60, 10, 200)) for i in range(2)]
    batch = processor(
        text=["a photo of a forest.", "a photo of a river."], images=images, return_tensors="pt", padding=True
    )
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = clip(**batch)
        feats = vision(pixel_values=batch["pixel_values"]).pooler_output
    assert out.logits_per_image.shape == (2, 2) and feats.shape == (2, 32)


def test_key_layouts_load_identically_and_differ_moderately_from_base(small_clip: Path, tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    prefixed = make_finetuned_variant(small_clip, tmp_path / "p", seed=7, key_layout="prefixed")
    bare = make_finetuned_variant(small_clip, tmp_path / "b", seed=7, key_layout="bare")
    assert all(k.startswith("vision_model.") for k in _raw_keys(prefixed))
    assert not any(k.startswith("vision_model.") for k in _raw_keys(bare))
    state_p = CLIPVisionModel.from_pretrained(prefixed).state_dict()
    state_b = CLIPVisionModel.from_pretrained(bare).state_dict()
    assert state_p.keys() == state_b.keys()
    assert all(torch.equal(state_p[k], state_b[k]) for k in state_p)
    base = tiny_models._load_base_vision(small_clip).state_dict()
    assert base.keys() == state_p.keys()
    for key, value in base.items():
        if value.is_floating_point() and value.ndim >= 2:  # weight matrices: small but real changes
            rel = ((state_p[key] - value).norm() / value.norm()).item()
            assert 1e-3 < rel < 0.1, (key, rel)
    total = sum(((state_p[k] - v) ** 2).sum() for k, v in base.items()) ** 0.5
    assert 0 < total / sum((v**2).sum() for v in base.values()) ** 0.5 < 0.05
    with pytest.raises(ValueError, match="key_layout"):
        make_finetuned_variant(small_clip, tmp_path / "x", seed=7, key_layout="flat")  # type: ignore[arg-type]


def test_example_uses_both_key_layouts(example: TinyExample) -> None:
    layouts = {all(k.startswith("vision_model.") for k in _raw_keys(p)) for p in example.finetuned.values()}
    assert layouts == {True, False}
    seeds_differ = [_tensors(p) for p in example.finetuned.values()]
    first, second = (next(v for k, v in s.items() if k.endswith("patch_embedding.weight")) for s in seeds_differ[:2])
    assert not torch.equal(first, second)


def test_same_seed_gives_bitwise_identical_weights(small_clip: Path, tmp_path: Path) -> None:
    again = build_tiny_clip(tmp_path / "again", corpus=SMALL_CORPUS, seed=0)
    other = build_tiny_clip(tmp_path / "other", corpus=SMALL_CORPUS, seed=1)
    a, b, c = _tensors(small_clip), _tensors(again), _tensors(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    v1 = make_finetuned_variant(small_clip, tmp_path / "v1", seed=3, key_layout="bare")
    v2 = make_finetuned_variant(again, tmp_path / "v2", seed=3, key_layout="bare")
    assert (v1 / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- datasets


def test_datasets_have_splits_features_sizes_and_modes(example: TinyExample) -> None:
    import datasets

    for task, classnames in example.tasks.items():
        dd = datasets.load_from_disk(str(example.datasets[task]))
        assert set(dd) == {"train", "test"}
        for split in ("train", "test"):
            ds = dd[split]
            assert isinstance(ds.features["image"], datasets.Image)
            assert ds.features["label"] == datasets.ClassLabel(names=classnames)
            assert len(ds) == 4 * len(classnames) and sorted(set(ds["label"])) == list(range(len(classnames)))
            modes = {(img.mode, img.size) for img in ds["image"]}
            assert modes == {("L" if task == "mnist" else "RGB", (32, 32))}


def test_dataset_images_are_class_dependent_and_deterministic(tmp_path: Path) -> None:
    import datasets

    names = [f"c{i}" for i in range(6)]
    paths = [build_tiny_image_dataset(tmp_path / d, classnames=names, n_train_per_class=3, seed=5) for d in "ab"]
    a, b = (datasets.load_from_disk(str(p)) for p in paths)
    assert [img.tobytes() for img in a["test"]["image"]] == [img.tobytes() for img in b["test"]["image"]]
    arrays = {s: np.stack([np.asarray(i, np.float32).ravel() for i in a[s]["image"]]) for s in ("train", "test")}
    labels = {s: np.asarray(a[s]["label"]) for s in ("train", "test")}
    means = np.stack([arrays["train"][labels["train"] == c].mean(0) for c in range(len(names))])
    pred = ((arrays["test"][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels["test"]).mean() >= 0.9  # nearest class mean separates the classes
    grey = build_tiny_image_dataset(tmp_path / "g", classnames=names, seed=5, mode="L")
    assert datasets.load_from_disk(str(grey))["train"][0]["image"].mode == "L"


# --------------------------------------------------------------------------- the example


def test_example_layout_and_marker(example: TinyExample) -> None:
    assert example.tasks == {t: list(c) for t, c in DEFAULT_TASKS.items()}
    assert example.base_model == example.root / "models" / "clip-tiny"
    assert example.finetuned == {t: example.root / "models" / f"clip-tiny_{t}" for t in DEFAULT_TASKS}
    assert example.datasets == {t: example.root / "datasets" / t for t in DEFAULT_TASKS}
    marker = json.loads((example.root / ".complete").read_text())
    assert marker["seed"] == 0 and marker["format"] == tiny_clip.FORMAT_VERSION
    assert [p.name for p in example.root.parent.iterdir()] == [example.root.name]  # no temp leftovers


def test_example_is_idempotent(example: TinyExample, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = [os.stat(p).st_mtime_ns for p in (example.root, example.root / ".complete", example.base_model)]

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a complete example")

    monkeypatch.setattr(tiny_clip, "_build_into", no_rebuild)
    start = time.perf_counter()
    again = build_tiny_example(example.root)
    assert time.perf_counter() - start < 0.5
    assert again == example
    assert stamps == [os.stat(p).st_mtime_ns for p in (example.root, example.root / ".complete", example.base_model)]


def test_example_crash_leaves_nothing_and_stale_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = {"toy": ["x", "y"]}
    root = tmp_path / "ex"

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(tiny_clip, "build_tiny_image_dataset", crash)
        with pytest.raises(RuntimeError, match="boom"):
            build_tiny_example(root, tasks=tasks)
    assert list(tmp_path.iterdir()) == []
    build_tiny_example(root, tasks=tasks, seed=0)
    rebuilt = build_tiny_example(root, tasks=tasks, seed=1)  # stale marker: rebuilt in place
    assert json.loads((root / ".complete").read_text())["seed"] == 1
    assert rebuilt.finetuned["toy"].is_dir() and [p.name for p in tmp_path.iterdir()] == ["ex"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_example(tmp_path / "foreign", tasks=tasks)
    assert (tmp_path / "foreign" / "data.txt").read_text() == "keep me"
