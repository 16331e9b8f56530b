"""Build the built-in offline benchmark's models from scratch, deterministically.

    python -m fusion_bench.scripts.build_mini_clip --out DIR [--threads N] [--design v1]

By default this builds the shipped design (eight tasks that are each their own image domain;
:mod:`fusion_bench.scripts.build_mini_clip_v2`, whose steps differ from the ones below in the
tasks, the pre-training pool and the recipe; docs/mini_clip_benchmark.md); the shipped
``fusion_bench/assets/mini-clip`` is ``--threads 1`` with the default recipe. ``--design v1``
builds the first design (docs/mini_clip_benchmark_v1.md), with its own recipe flags, as follows.

Steps (every one seeded by the recipe's ``seed``):

1. the eight tasks' datasets (:mod:`fusion_bench.data.mini_tasks`, generated into the cache);
2. a CLIP-format BPE tokenizer trained on captions and the tasks' prompts
   (:func:`fusion_bench.testing.train_tiny_clip_tokenizer`) and a randomly initialised tiny
   ``CLIPModel`` with its ``CLIPProcessor``;
3. contrastive pre-training on generated image–caption batches
   (:mod:`fusion_bench.models.clip_pretrain`, :mod:`fusion_bench.data.mini_tasks.pretraining`);
4. one expert per task: ``clip_finetune`` of the vision encoder on the task's train split.

``DIR`` is replaced atomically by a folder holding ``clip-mini`` (the pre-trained CLIP and its
processor), ``clip-mini_<task>`` (the experts: ``CLIPVisionModel`` + processor) and
``BUILD.json`` (recipe, library versions, thread count, training losses, SHA-256 of every
file). ``FUSION_BENCH_MINI_CLIP_DIR=DIR`` makes the configs use a rebuild instead of the shipped
models (the first design's with the ``mini-clip-v1_TA8`` configs). The same machine, thread
count and library versions give the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fusion_bench.data import mini_tasks
from fusion_bench.data.mini_tasks.pretraining import pretraining_batch
from fusion_bench.utils.io import atomic_directory

__all__ = ["MiniClipRecipe", "build_mini_clip", "main", "tokenizer_corpus"]

BASE_NAME = "clip-mini"
BUILD_FORMAT = 1
IMAGE_SIZE = 32


@dataclass(frozen=True)
class MiniClipRecipe:
    """Everything that determines the built models.

    Attributes:
        seed: seeds the initialisation, the pre-training batches and the experts' data order.
        vocab_size: the tokenizer's byte symbols plus merges (the caption words need ~800).
        hidden_size / intermediate_size / num_layers / num_heads: both towers' sizes.
        patch_size: ViT patch size (32×32 images).
        projection_dim: size of the joint embedding.
        pretrain_steps / pretrain_batch_size / pretrain_group_size / pretrain_learning_rate:
            contrastive pre-training (AdamW, warm-up then cosine decay).
        finetune_steps / finetune_batch_size / finetune_learning_rate: each expert's
            ``clip_finetune`` run (Adam, fixed learning rate).
    """

    seed: int = 0
    vocab_size: int = 768
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 4
    projection_dim: int = 64
    pretrain_steps: int = 2000
    pretrain_batch_size: int = 128
    pretrain_group_size: int = 8
    pretrain_learning_rate: float = 2e-3
    finetune_steps: int = 200
    finetune_batch_size: int = 64
    finetune_learning_rate: float = 1e-3


def tokenizer_corpus() -> list[str]:
    """The tokenizer's training texts: every caption word in context and every task prompt."""
    prompts = [t.format(c) for task in mini_tasks.MINI_TASKS.values() for t in task.templates for c in task.classnames]
    return mini_tasks.caption_vocabulary_corpus() + prompts


def _pixel_values(images: np.ndarray, image_processor: Any) -> torch.Tensor:
    """``(B, 32, 32, 3)`` uint8 images -> normalised ``(B, 3, 32, 32)``, as ``image_processor`` does.

    Raises:
        ValueError: the processor would resize or crop (it must take the images as they are).
    """
    crop = image_processor.crop_size
    if (crop["height"], crop["width"]) != images.shape[1:3]:
        raise ValueError(f"the image processor crops to {crop}, not to the scenes' {images.shape[1:3]}")
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _init_clip(out: Path, recipe: Any, corpus: Sequence[str] | None = None) -> None:
    """Train the tokenizer and save a randomly initialised CLIP with its processor to ``out``.

    Like :func:`fusion_bench.testing.build_tiny_clip`, with a vocabulary large enough for
    every caption word to be one token (short sequences keep the text tower cheap).
    ``corpus``: the tokenizer's texts (default: :func:`tokenizer_corpus`, the first design's).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from fusion_bench.testing import train_tiny_clip_tokenizer

    tokenizer = train_tiny_clip_tokenizer(out, corpus or tokenizer_corpus(), vocab_size=recipe.vocab_size)
    layers = dict(
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
    )
    text_layers = getattr(recipe, "text_num_layers", recipe.num_layers)
    text = dict(
        layers,
        num_hidden_layers=text_layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text,
        vision_config=dict(layers, image_size=IMAGE_SIZE, patch_size=recipe.patch_size),
        projection_dim=recipe.projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    model.save_pretrained(str(out))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    image_processor.save_pretrained(str(out))  # also the standalone preprocessor_config.json


def _pretrain(clip_dir: Path, recipe: MiniClipRecipe) -> list[float]:
    """Pre-train the CLIP in ``clip_dir`` contrastively and save its weights back there."""
    from transformers import CLIPModel, CLIPProcessor

    from fusion_bench.models.clip_pretrain import PretrainConfig, pretrain_clip

    model, processor = CLIPModel.from_pretrained(str(clip_dir)), CLIPProcessor.from_pretrained(str(clip_dir))

    def batches(step: int) -> tuple[torch.Tensor, list[str]]:
        images, captions = pretraining_batch(
            recipe.seed, step, batch_size=recipe.pretrain_batch_size, group_size=recipe.pretrain_group_size
        )
        return _pixel_values(images, processor.image_processor), captions

    config = PretrainConfig(num_steps=recipe.pretrain_steps, learning_rate=recipe.pretrain_learning_rate)
    losses = pretrain_clip(model, processor.tokenizer, batches, config)
    model.eval().save_pretrained(str(clip_dir))
    return losses


def _finetune(clip_dir: Path, task: str, out: Path, recipe: MiniClipRecipe) -> dict[str, Any]:
    """Fine-tune the vision encoder of ``clip_dir`` on ``task`` with ``clip_finetune``; save to ``out``."""
    import lightning

    from fusion_bench.method.train.clip_finetune import CLIPFinetuneAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool

    pool = CLIPVisionModelPool(
        {"_pretrained_": str(clip_dir)},
        train_datasets={task: {"path": mini_tasks.mini_path(f"datasets/{task}"), "split": "train"}},
    )
    algorithm = CLIPFinetuneAlgorithm(
        task=task,
        learning_rate=recipe.finetune_learning_rate,
        lr_scheduler="fixed",
        num_steps=recipe.finetune_steps,
        batch_size=recipe.finetune_batch_size,
        seed=recipe.seed,
        save_path=str(out),
    )
    algorithm.fabric = lightning.Fabric(accelerator="cpu", devices=1)
    algorithm.run(pool)
    return algorithm.extra_report()["clip_finetune"]


def write_build_record(folder: Path, recipe: Any, tasks: Sequence[str], training: dict, **extra: Any) -> None:
    """``folder/BUILD.json``: the format, ``extra`` (e.g. ``design``), the recipe, the tasks, the training record,
    thread count, library versions and the SHA-256 of every file already in ``folder``."""
    import transformers

    build = {
        "format": BUILD_FORMAT,
        **extra,
        "recipe": dataclasses.asdict(recipe),
        "tasks": list(tasks),
        "training": training,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "files": _digests(folder),
    }
    (folder / "BUILD.json").write_text(json.dumps(build, indent=1) + "\n")


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (sorted)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _log(message: str, start: float) -> None:
    print(f"[build_mini_clip {time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _build_into(tmp: Path, recipe: MiniClipRecipe, tasks: Sequence[str], start: float) -> dict[str, Any]:
    """Build every model into ``tmp``; return the training record for ``BUILD.json``."""
    mini_tasks.build_mini_task_datasets(mini_tasks.mini_tasks_root())
    _log("datasets ready", start)
    clip_dir = tmp / BASE_NAME
    _init_clip(clip_dir, recipe)
    losses = _pretrain(clip_dir, recipe)
    _log(f"pre-trained: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}", start)
    record: dict[str, Any] = {
        "pretrain_loss": {"first": float(np.mean(losses[:20])), "last": float(np.mean(losses[-20:]))}
    }
    for task in tasks:
        record[task] = _finetune(clip_dir, task, tmp / f"{BASE_NAME}_{task}", recipe)
        _log(f"expert {task!r}: loss {record[task]['loss_first']:.3f} -> {record[task]['loss_last']:.3f}", start)
    return record


def build_mini_clip(
    out: str | Path, recipe: MiniClipRecipe = MiniClipRecipe(), *, tasks: Sequence[str] | None = None
) -> Path:
    """Build the pre-trained mini CLIP and its experts into ``out`` (replaced atomically).

    Args:
        out: the output folder.
        recipe: sizes, steps, learning rates and seed.
        tasks: the tasks to fine-tune experts on (default: all eight, in benchmark order).

    Returns:
        ``out`` as a ``Path``.
    """

    tasks = list(tasks or mini_tasks.MINI_TASKS)
    for task in tasks:
        mini_tasks.get_mini_task(task)  # unknown names fail before any work
    start = time.perf_counter()
    with atomic_directory(out, overwrite=True) as tmp:  # rebuilding the shipped folder in place
        record = _build_into(tmp, recipe, tasks, start)
        write_build_record(tmp, recipe, tasks, record)
    _log(f"done: {out}", start)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2, build_mini_clip_v2

    design = argparse.ArgumentParser(add_help=False)
    design.add_argument("--design", choices=("v1", "v2"), default="v2")
    chosen, _ = design.parse_known_args(argv)
    recipe_type = MiniClipRecipeV2 if chosen.design == "v2" else MiniClipRecipe
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench.scripts.build_mini_clip", description=__doc__.split("\n")[0], parents=[design]
    )
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (bytes are reproducible per thread count)"
    )
    parser.add_argument("--tasks", nargs="*", default=None, help="fine-tune only these tasks (default: all eight)")
    defaults = recipe_type()
    for field in dataclasses.fields(recipe_type):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    for share in ("class_mention", "pretrain_task_appearance", "pool_contrast", "pool_tint"):
        value = getattr(args, share, 0.0)
        if not 0.0 <= value <= 1.0:
            parser.error(f"--{share.replace('_', '-')} must be in [0, 1], got {value!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipe = recipe_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(recipe_type)})
    if chosen.design == "v2":
        build_mini_clip_v2(args.out, recipe, tasks=args.tasks)
    else:
        build_mini_clip(args.out, recipe, tasks=args.tasks)


if __name__ == "__main__":
    main()
