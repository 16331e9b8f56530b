"""Benchmark: evaluating the mini benchmark vs a bare forward of the same encoder on the same number of images.

``evaluate``: the task pool of ``taskpool=CLIPVisionModelTaskPool/mini-clip_TA8`` evaluating the
mini pre-trained encoder on the eight tasks' test splits (4,000 images): dataset reading, image
decoding, preprocessing, forward, head, accounting. Heads and datasets are built before the clock
starts (they are cached across runs). ``bare forward``: the zero-shot classifier alone on random
pixel tensors of the same shape, the same batch size, the same number of images. Both in this
process, same threads, alternated; the best of ``--repeat`` runs of each, wall and CPU seconds.

``--vit-b32``: the same comparison on a 224-px ViT-B/32-size encoder (hidden 768, 12 layers,
patch 32; random weights, saved locally with a small text tower for the zero-shot head) and a local
dataset of ``--images`` JPEG images of varied sizes (64 to 512 px a side, saved with ``datasets``),
preprocessed by the real ``CLIPImageProcessor`` (resize of the shortest edge to 224, bicubic;
centre crop 224; rescale; normalise). The bare forward runs on the processor's own output for the
same images (computed before the clock starts), batch ``--vit-batch-size``.

Targets (issue 18): evaluate >= 0.9x the bare forward's images/s, on both.

    python benchmarks/evaluation_speed.py [--repeat 3] [--threads 1] [--vit-b32 [--images 256] [--vit-batch-size 32]]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_taskpool():
    from hydra import compose, initialize_config_dir

    from fusion_bench.example import register_resolvers
    from fusion_bench.scripts.cli import CONFIG_DIR
    from fusion_bench.taskpool import TASKPOOLS
    from fusion_bench.utils.instantiate import instantiate_component

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=["taskpool=CLIPVisionModelTaskPool/mini-clip_TA8"])
    return instantiate_component(cfg.taskpool, TASKPOOLS, key="type", what="taskpool")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit-b32", action="store_true", help="a 224-px ViT-B/32-size encoder, real preprocessing")
    parser.add_argument("--images", type=int, default=256, help="--vit-b32: images in the local dataset")
    parser.add_argument("--vit-batch-size", type=int, default=32)
    args = parser.parse_args()
    import torch

    if args.vit_b32:
        torch.set_num_threads(args.threads)
        vit_b32(args)
        return

    from fusion_bench.data.mini_tasks import mini_clip_dir

    torch.set_num_threads(args.threads)
    pool = build_taskpool()
    from transformers import CLIPVisionModel

    encoder = CLIPVisionModel.from_pretrained(str(mini_clip_dir() / "clip-mini")).eval()
    pool.evaluate(encoder)  # warm-up: heads, datasets, decoded-image caches
    counts = dict(pool.evaluation_meta()["num_samples"])
    total = sum(counts.values())
    batch_size = int(pool.dataloader_kwargs.get("batch_size", 128))
    size = pool._image_processor().crop_size["height"]

    classifier = pool.get_classifier(encoder, pool.task_names[0]).eval()
    batches = [torch.randn(min(batch_size, total - i), 3, size, size) for i in range(0, total, batch_size)]

    @torch.inference_mode()
    def bare() -> None:
        for pixels in batches:
            classifier(pixels).argmax(dim=-1)

    runs = [(_timed_cpu(lambda: pool.evaluate(encoder)), _timed_cpu(bare)) for _ in range(args.repeat)]
    evaluate_s, bare_s = min(r[0][0] for r in runs), min(r[1][0] for r in runs)
    evaluate_cpu, bare_cpu = min(r[0][1] for r in runs), min(r[1][1] for r in runs)
    ours, floor = total / evaluate_s, total / bare_s
    print(
        f"evaluation of the mini benchmark: {total} images, batch {batch_size}, {args.threads} thread(s), "
        f"best of {args.repeat}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"evaluate       {evaluate_s:6.2f} s wall {ours:8.0f} images/s   {evaluate_cpu:6.2f} s CPU")
    print(f"bare forward   {bare_s:6.2f} s wall {floor:8.0f} images/s   {bare_cpu:6.2f} s CPU")
    print(
        f"evaluate / bare forward images/s: wall {ours / floor:.2f}, CPU {bare_cpu / evaluate_cpu:.2f} (target >= 0.9)"
    )
    meta = pool.evaluation_meta()
    if "images_per_second" in meta:
        print("meta images/s per task:", {k: round(v) for k, v in meta["images_per_second"].items()})


# ---- --vit-b32 ----------------------------------------------------------------------------------------
def build_vit_b32_clip(folder: Path) -> Path:
    """A random-weight CLIP with a ViT-B/32-size vision tower (224 px) and a small text tower, its tokenizer
    (the mini CLIP's) and a 224-px ``CLIPImageProcessor``, saved under ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    from fusion_bench.data.mini_tasks import mini_clip_dir

    mini = mini_clip_dir() / "clip-mini"
    tokenizer = CLIPTokenizerFast.from_pretrained(str(mini))
    text = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text.update(pad_token_id=tokenizer.pad_token_id)
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    vision.update(patch_size=32, image_size=224)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512))
    model.save_pretrained(str(folder))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def build_image_dataset(folder: Path, count: int, num_classes: int = 10) -> Path:
    """``count`` smooth random JPEG images, 64 to 512 px a side, with labels, saved as a ``test`` split."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(64, 513, size=2))
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((w, h), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(i % num_classes)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{k}" for k in range(num_classes)])}
    )
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(str(folder))
    return folder


def vit_b32(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    from transformers import CLIPVisionModel

    from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool

    with tempfile.TemporaryDirectory(prefix="fb-eval-speed-") as tmp:
        model_dir = build_vit_b32_clip(Path(tmp) / "clip")
        data_dir = build_image_dataset(Path(tmp) / "images", args.images)
        entry = {"path": str(data_dir), "split": "test", "classnames": [f"c{k}" for k in range(10)]}
        entry["templates"] = ["a photo of a {}."]
        pool = CLIPVisionModelTaskPool(
            {"synthetic": entry},
            clip_model=str(model_dir),
            dataloader_kwargs={"batch_size": args.vit_batch_size},
            head_cache_dir=None,
        )
        encoder = CLIPVisionModel.from_pretrained(str(model_dir)).eval()
        pool.evaluate(encoder)  # warm-up: head, dataset
        processor = pool._image_processor()
        dataset = pool.test_datasets["synthetic"]
        batches = []
        for start in range(0, len(dataset), args.vit_batch_size):
            rows = dataset[start : start + args.vit_batch_size]
            images = [image.convert("RGB") for image in rows["image"]]
            batches.append(processor(images=images, return_tensors="pt")["pixel_values"])
        classifier = pool.get_classifier(encoder, "synthetic").eval()

        @torch.inference_mode()
        def bare() -> None:
            for pixels in batches:
                classifier(pixels).argmax(dim=-1)

        runs = []
        for _ in range(args.repeat):  # alternated, so both see the same machine load
            runs.append((_timed_cpu(lambda: pool.evaluate(encoder)), _timed_cpu(bare)))
    evaluate_s, bare_s = min(r[0][0] for r in runs), min(r[1][0] for r in runs)
    evaluate_cpu, bare_cpu = min(r[0][1] for r in runs), min(r[1][1] for r in runs)
    total = len(dataset)
    ours, floor = total / evaluate_s, total / bare_s
    print(
        f"evaluation of a 224-px ViT-B/32-size encoder with CLIPImageProcessor: {total} JPEG images "
        f"(64-512 px), batch {args.vit_batch_size}, {args.threads} thread(s), best of {args.repeat}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"evaluate       {evaluate_s:6.2f} s wall {ours:6.1f} images/s   {evaluate_cpu:6.2f} s CPU")
    print(f"bare forward   {bare_s:6.2f} s wall {floor:6.1f} images/s   {bare_cpu:6.2f} s CPU")
    print(
        f"evaluate / bare forward images/s: wall {ours / floor:.2f}, CPU {bare_cpu / evaluate_cpu:.2f} (target >= 0.9)"
    )
    print("meta images/s per task:", pool.evaluation_meta().get("images_per_second"))


def _timed_cpu(fn) -> tuple[float, float]:
    """Wall and CPU seconds (this process; on a loaded machine the steadier measure) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
