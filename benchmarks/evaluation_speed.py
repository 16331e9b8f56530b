"""Benchmark: evaluating the mini benchmark vs a bare forward of the same encoder on the same number of images.

``evaluate``: the task pool of ``taskpool=CLIPVisionModelTaskPool/mini-clip_TA8`` evaluating the
mini pre-trained encoder on the eight tasks' test splits (4,000 images): dataset reading, image
decoding, preprocessing, forward, head, accounting. Heads and datasets are built before the clock
starts (they are cached across runs). ``bare forward``: the zero-shot classifier alone on random
pixel tensors of the same shape, the same batch size, the same number of images. Both in this
process, same threads; the best of ``--repeat`` runs of each.

Target (issue 18): evaluate >= 0.9x the bare forward's images/s.

    python benchmarks/evaluation_speed.py [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    import torch

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

    evaluate_s = min(_timed(lambda: pool.evaluate(encoder)) for _ in range(args.repeat))
    classifier = pool.get_classifier(encoder, pool.task_names[0]).eval()
    batches = [torch.randn(min(batch_size, total - i), 3, size, size) for i in range(0, total, batch_size)]

    @torch.inference_mode()
    def bare() -> None:
        for pixels in batches:
            classifier(pixels).argmax(dim=-1)

    bare_s = min(_timed(bare) for _ in range(args.repeat))
    ours, floor = total / evaluate_s, total / bare_s
    print(f"evaluation of the mini benchmark: {total} images, batch {batch_size}, {args.threads} thread(s)")
    print(f"evaluate       {evaluate_s:6.2f} s  {ours:8.0f} images/s")
    print(f"bare forward   {bare_s:6.2f} s  {floor:8.0f} images/s")
    print(f"evaluate / bare forward: {ours / floor:.2f} (target >= 0.9)")
    meta = pool.evaluation_meta()
    if "images_per_second" in meta:
        print("meta images/s per task:", {k: round(v) for k, v in meta["images_per_second"].items()})


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
