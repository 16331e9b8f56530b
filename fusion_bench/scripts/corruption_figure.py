"""A PNG grid of one image under every corruption and severity (rows: corruptions; columns: clean, 1-5).

    python -m fusion_bench.scripts.corruption_figure --mini-task signs --index 0 --table cifar \\
        --out docs/images/corruptions_mini.png
    python -m fusion_bench.scripts.corruption_figure --dataset tanganke/gtsrb --index 0 --crop-size 224 \\
        --out gtsrb_corruptions.png

The corruptions are those of :mod:`fusion_bench.data.corruptions`, with the same per-image
seeding as the datasets (image ``index`` under ``--seed``), so the figure shows exactly what the
robustness experiments evaluate on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from fusion_bench.data.corruptions import CORRUPTIONS, CorruptionSpec, resize_center_crop

__all__ = ["corruption_grid", "save_corruption_grid", "main"]


def corruption_grid(
    image: Any,
    *,
    index: int = 0,
    seed: int = 0,
    table: str = "imagenet",
    crop_size: int | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
) -> Any:
    """A matplotlib figure: ``image`` clean and under each corruption at each severity.

    Args:
        image: a PIL image.
        index: the image's dataset index (selects its noise).
        seed: the corruption seed.
        table: ``"imagenet"`` or ``"cifar"`` parameters.
        crop_size: resize + centre-crop before corrupting (as the dataset entries' ``crop_size``).
        severities: the columns after the clean one.

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 * (len(severities) + 1), 1.6 * len(CORRUPTIONS)), layout="constrained")
    axes = fig.subplots(len(CORRUPTIONS), len(severities) + 1, squeeze=False)
    for row, name in zip(axes, CORRUPTIONS):
        specs = [CorruptionSpec(name, s, seed=seed, table=table, crop_size=crop_size) for s in severities]
        clean = image if crop_size is None else resize_center_crop(image, crop_size)
        cells = [clean] + [spec.apply(image, index) for spec in specs]
        for ax, img, label in zip(row, cells, ["clean", *(f"severity {s}" for s in severities)]):
            ax.imshow(img, cmap="gray" if img.mode == "L" else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if name == CORRUPTIONS[0]:
                ax.set_title(label, fontsize=9)
        row[0].set_ylabel(name, fontsize=9)
    return fig


def save_corruption_grid(image: Any, path: str | Path, **options: Any) -> Path:
    """Write :func:`corruption_grid` of ``image`` to ``path`` as a PNG (atomically); return the path."""
    from fusion_bench.utils.io import atomic_write

    fig = corruption_grid(image, **options)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return Path(path)


def _load_image(args: argparse.Namespace) -> Any:
    from fusion_bench.data.loading import load_dataset_from_config

    entry = args.dataset
    if args.mini_task is not None:
        from fusion_bench.data.mini_tasks import mini_path

        entry = mini_path(f"datasets/{args.mini_task}")
    dataset = load_dataset_from_config(
        {"path": entry, "split": args.split}, split=args.split, what=f"dataset {entry!r}"
    )
    return dataset[args.index]["image"]


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (see module docstring)."""
    from fusion_bench.data.mini_tasks import BENCHMARK_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a dataset entry: hub id or local save_to_disk folder")
    source.add_argument(
        "--mini-task",
        help=f"a task of the built-in offline benchmark ({', '.join(BENCHMARK_TASKS)}; "
        "the first design's shape, color, ... too)",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--index", type=int, default=0, help="the image's row (also selects its noise)")
    parser.add_argument("--seed", type=int, default=0, help="the corruption seed")
    parser.add_argument("--table", default="imagenet", choices=["imagenet", "cifar"], help="parameter table")
    parser.add_argument("--crop-size", type=int, default=None, help="resize + centre-crop first (e.g. 224)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    path = save_corruption_grid(
        _load_image(args), args.out, index=args.index, seed=args.seed, table=args.table, crop_size=args.crop_size
    )
    print(path)
    return path


if __name__ == "__main__":
    main()
