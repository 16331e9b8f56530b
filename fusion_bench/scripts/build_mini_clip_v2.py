"""The second design of the offline benchmark's models (``build_mini_clip --design v2``).

Same steps as the first design (:mod:`fusion_bench.scripts.build_mini_clip`), on the eight
image domains of :mod:`fusion_bench.data.mini_tasks.domains`:

1. the tasks' datasets (:func:`fusion_bench.data.mini_tasks.v2.build_mini_task_datasets_v2`);
2. a tokenizer trained on the captions and prompts, and a randomly initialised ``CLIPModel``;
3. contrastive pre-training (4,800 steps) on a pool of 6,000 generated images per domain
   (:func:`~fusion_bench.data.mini_tasks.v2.pretraining_pool`: colours rotated, and the four domains
   that rotation leaves alone at 40% contrast), each step a seeded random batch with freshly drawn
   captions that name the class (80% of them) or only the domain;
4. one expert per task: ``clip_finetune`` (Adam, lr 1e-4, 400 steps of 32 images): far enough that
   the experts gain 35–42 points over zero-shot and task arithmetic keeps part of every gain, near
   enough that the merges stay in the pre-trained model's basin (a smaller learning rate, 3e-5 for
   200 steps, gained 28 points and left task arithmetic only 8 above zero-shot).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_bench.data.mini_tasks import v2
from fusion_bench.data.mini_tasks.domains import DOMAINS
from fusion_bench.utils.io import atomic_directory

__all__ = ["MiniClipRecipeV2", "build_mini_clip_v2", "datasets_root_v2"]


@dataclass(frozen=True)
class MiniClipRecipeV2:
    """Everything that determines the second design's models.

    Attributes:
        seed: seeds the initialisation, the pre-training pool and batches, and the experts' data order.
        vocab_size / hidden_size / intermediate_size / num_layers / num_heads / patch_size / projection_dim:
            the tokenizer's and both towers' sizes (``num_layers``: the vision tower's depth).
        text_num_layers: the text tower's depth (it only has to tell ~70 short class names apart).
        pretrain_images_per_task: size of the pre-training pool, per domain.
        class_mention: chance that a pre-training caption names the class.
        pretrain_task_appearance: share of the pre-training images rendered as the tasks' images are
            (the others in the pool's own colours, :func:`~fusion_bench.data.mini_tasks.v2.pool_appearance`).
        pool_contrast: contrast of the pool's images of the domains the colour change leaves alone
            (:data:`~fusion_bench.data.mini_tasks.v2.POOL_CONTRAST_DOMAINS`; 1.0: the tasks' own contrast).
        pool_tint: below 1.0, the pool's house numbers and textures are tinted instead (red channel × this,
            :func:`~fusion_bench.data.mini_tasks.v2.pool_tint`); 1.0: no tint.
        pretrain_steps / pretrain_batch_size / pretrain_learning_rate: contrastive pre-training
            (AdamW, warm-up then cosine decay).
        finetune_steps / finetune_batch_size / finetune_learning_rate: each expert's
            ``clip_finetune`` run (Adam, fixed learning rate).
        n_train / n_test: images per task and split.
    """

    seed: int = 0
    vocab_size: int = 768
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    text_num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 8
    projection_dim: int = 64
    pretrain_images_per_task: int = 6000
    class_mention: float = 0.8
    pretrain_task_appearance: float = 0.0
    pool_contrast: float = 0.4
    pool_tint: float = 1.0
    pretrain_steps: int = 4800
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 2e-3
    finetune_steps: int = 400
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 1e-4
    n_train: int = 2000
    n_test: int = 500


def datasets_root_v2(n_train: int, n_test: int) -> Path:
    """The cache folder of the second design's datasets of these sizes (built on first use)."""
    from fusion_bench.data.mini_tasks import mini_tasks_root

    base = mini_tasks_root()
    shipped = (MiniClipRecipeV2.n_train, MiniClipRecipeV2.n_test)  # the recipe's defaults: the shipped sizes
    suffix = "" if (n_train, n_test) == shipped else f"-{n_train}-{n_test}"
    return v2.build_mini_task_datasets_v2(
        base.parent / f"mini_tasks-design2-v{v2.DATASET_FORMAT_V2}{suffix}", n_train=n_train, n_test=n_test
    )


def _pretrain_v2(clip_dir: Path, recipe: MiniClipRecipeV2) -> list[float]:
    """Pre-train the CLIP in ``clip_dir`` on the pre-training pool; save its weights back there."""
    from transformers import CLIPModel, CLIPProcessor

    from fusion_bench.models.clip_pretrain import PretrainConfig, pretrain_clip
    from fusion_bench.scripts.build_mini_clip import _pixel_values

    model, processor = CLIPModel.from_pretrained(str(clip_dir)), CLIPProcessor.from_pretrained(str(clip_dir))
    images, tasks, labels = v2.pretraining_pool(
        recipe.seed,
        recipe.pretrain_images_per_task,
        recipe.pretrain_task_appearance,
        recipe.pool_contrast,
        recipe.pool_tint,
    )

    def batches(step: int) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng([recipe.seed, step])
        idx = rng.choice(len(images), recipe.pretrain_batch_size, replace=False)
        captions = [v2.caption_v2(rng, v2.TASKS_V2[tasks[i]], int(labels[i]), recipe.class_mention) for i in idx]
        return _pixel_values(images[idx], processor.image_processor), captions

    config = PretrainConfig(num_steps=recipe.pretrain_steps, learning_rate=recipe.pretrain_learning_rate)
    losses = pretrain_clip(model, processor.tokenizer, batches, config)
    model.eval().save_pretrained(str(clip_dir))
    return losses


def _finetune_v2(clip_dir: Path, task: str, data_root: Path, out: Path, recipe: MiniClipRecipeV2) -> dict[str, Any]:
    """``clip_finetune`` the vision encoder of ``clip_dir`` on ``task``; save to ``out``."""
    import lightning

    from fusion_bench.method.train.clip_finetune import CLIPFinetuneAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool

    pool = CLIPVisionModelPool(
        {"_pretrained_": str(clip_dir)}, train_datasets={task: {"path": str(data_root / task), "split": "train"}}
    )
    algorithm = CLIPFinetuneAlgorithm(
        task=task,
        classnames=list(DOMAINS[task].classnames),
        templates=list(DOMAINS[task].templates),
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


def build_mini_clip_v2(
    out: str | Path, recipe: MiniClipRecipeV2 = MiniClipRecipeV2(), *, tasks: Sequence[str] | None = None
) -> Path:
    """Build the second design's pre-trained mini CLIP and its experts into ``out`` (replaced atomically).

    Writes ``clip-mini``, ``clip-mini_<task>`` and ``BUILD.json`` (``"design": 2``, the recipe,
    library versions, thread count, losses and every file's SHA-256), like the first design.
    """
    from fusion_bench.scripts.build_mini_clip import BASE_NAME, _init_clip, _log, write_build_record

    tasks = list(tasks or v2.TASKS_V2)
    unknown = [t for t in tasks if t not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown design-2 tasks {unknown}; tasks: {', '.join(v2.TASKS_V2)}")
    start = time.perf_counter()
    with atomic_directory(out) as tmp:
        data_root = datasets_root_v2(recipe.n_train, recipe.n_test)
        _log("datasets ready", start)
        clip_dir = tmp / BASE_NAME
        _init_clip(clip_dir, recipe, v2.tokenizer_corpus_v2())
        losses = _pretrain_v2(clip_dir, recipe)
        _log(f"pre-trained: loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}", start)
        record: dict[str, Any] = {
            "pretrain_loss": {"first": float(np.mean(losses[:20])), "last": float(np.mean(losses[-20:]))}
        }
        for task in tasks:
            record[task] = _finetune_v2(clip_dir, task, data_root, tmp / f"{BASE_NAME}_{task}", recipe)
            _log(f"expert {task!r}: loss {record[task]['loss_first']:.3f} -> {record[task]['loss_last']:.3f}", start)
        write_build_record(tmp, recipe, tasks, record, design=2)
    _log(f"done: {out}", start)
    return Path(out)
