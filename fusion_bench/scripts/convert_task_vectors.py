"""Convert task_vectors' pickled checkpoints to plain state dicts, once, so they load without pickle.

    python -m fusion_bench.scripts.convert_task_vectors SRC DST

Every ``*.pt`` under ``SRC`` (task_vectors' layout: ``ViT-B-32/zeroshot.pt``,
``ViT-B-32/<Task>/finetuned.pt``, ``ViT-B-32/head_<Task>.pt``) is unpickled (this runs code from
the files: only for files you trust) and written under ``DST`` at the same relative path as a
weights-only ``torch.save`` state dict: encoders as their ``model.visual.*`` tensors, heads as
``{weight, bias}``. The shipped ``OpenCLIPVisionModelPool/<model>_TA8`` and
``OpenCLIPVisionModelTaskPool/<model>_TA8`` configs then read them with ``modelpool.model_dir=DST
taskpool.model_dir=DST`` and ``allow_pickle`` left false. Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.models.openclip_checkpoints import load_classification_head, read_encoder_checkpoint
from fusion_bench.utils.io import atomic_write

__all__ = ["convert_file", "convert_tree", "main"]


def convert_file(src: Path, dst: Path) -> str:
    """Convert one checkpoint (``head_*.pt``: a head; else an encoder); return what it was."""
    what = f"checkpoint {str(src)!r}"
    if src.name.startswith("head_"):
        head = load_classification_head(str(src), what=what, allow_pickle=True)
        state, kind = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, "head"
    else:
        state, _ = read_encoder_checkpoint(src, what=what, allow_pickle=True)
        state, kind = {k: v.contiguous() for k, v in state.items()}, "encoder"
    with atomic_write(dst, "wb") as f:
        torch.save(state, f)
    return kind


def convert_tree(src: Path, dst: Path) -> list[tuple[Path, str]]:
    """Convert every ``*.pt`` under ``src`` into ``dst`` (same relative paths)."""
    done = []
    for path in sorted(src.rglob("*.pt")):
        target = dst / path.relative_to(src)
        done.append((target, convert_file(path, target)))
    return done


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="task_vectors checkpoint folder (e.g. .cache/task_vectors_checkpoints)")
    parser.add_argument("dst", type=Path, help="where the state dicts go")
    args = parser.parse_args(argv)
    try:
        for target, kind in convert_tree(args.src, args.dst):
            print(f"{kind}: {target}")
    except FusionBenchError as err:
        print(f"convert_task_vectors: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
