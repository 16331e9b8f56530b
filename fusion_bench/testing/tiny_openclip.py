"""A tiny OpenCLIP example in the task_vectors checkpoint layout, built locally (no download).

:func:`build_tiny_openclip_example` writes, under ``root/ViT-T/`` (``ViT-T`` is a custom tiny
open_clip ViT, :data:`TINY_OPENCLIP_CONFIG`)::

    zeroshot.pt                 pre-trained encoder: a weights-only state dict in task_vectors'
                                ImageEncoder layout (model.visual.* plus text-tower leftovers)
    <Task>/finetuned.pt         the first task's expert, same layout
    <Task>/finetuned.safetensors  the second's: an open_clip CLIP state dict (visual.* keys)
    <Task>/                     the third's: a folder saved by the pool (open_clip_config.json + safetensors)
    head_<Task>.safetensors     heads: 30 x the pre-trained encoder's normalised class-mean features
                                on the task's train split (so the base is far above chance)

Experts are seeded perturbations of the pre-trained encoder. The image datasets are the tiny
CLIP example's (:func:`fusion_bench.testing.tiny_clip.build_tiny_example`). Deterministic under ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from fusion_bench.testing.build_cache import build_once
from fusion_bench.testing.tiny_models import _perturb_

__all__ = [
    "TINY_OPENCLIP_CONFIG",
    "ARCH_DIR",
    "TASK_VECTORS_NAMES",
    "TinyOpenCLIPExample",
    "build_tiny_openclip_example",
    "tiny_openclip_encoder",
]

TINY_OPENCLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
    "quick_gelu": True,
}
ARCH_DIR = "ViT-T"
FORMAT_VERSION = 1
_FORMATS = ("pt", "safetensors", "folder")
_HEAD_SCALE = 30.0


@dataclass(frozen=True)
class TinyOpenCLIPExample:
    """Paths of a built example.

    Attributes:
        root: the example's folder (the pool's ``model_dir``).
        pretrained: ``ViT-T/zeroshot.pt``.
        finetuned: task -> its expert (a ``.pt``, a ``.safetensors`` or a folder, by position).
        heads: task -> ``ViT-T/head_<Task>.safetensors``.
        datasets: task -> its ``DatasetDict`` folder.
    """

    root: Path
    pretrained: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]
    datasets: dict[str, Path]


# task_vectors' folder names of the eight tasks
TASK_VECTORS_NAMES = {
    "sun397": "SUN397",
    "stanford_cars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
}


def _folder_name(task: str) -> str:
    return TASK_VECTORS_NAMES.get(task, task)


def _layout(root: Path, datasets: Mapping[str, Path]) -> TinyOpenCLIPExample:
    arch = root / ARCH_DIR
    finetuned = {}
    for i, task in enumerate(datasets):
        fmt = _FORMATS[i % len(_FORMATS)]
        name = {"pt": "finetuned.pt", "safetensors": "finetuned.safetensors", "folder": "finetuned"}[fmt]
        finetuned[task] = arch / _folder_name(task) / name
    heads = {t: arch / f"head_{_folder_name(t)}.safetensors" for t in datasets}
    return TinyOpenCLIPExample(root, arch / "zeroshot.pt", finetuned, heads, {t: Path(p) for t, p in datasets.items()})


def tiny_openclip_encoder(seed: int = 0):
    """A randomly initialised tiny :class:`~fusion_bench.models.openclip_vision.ImageEncoder` (seeded)."""
    from fusion_bench.models.openclip_vision import ImageEncoder, OpenCLIPArchitecture

    arch = OpenCLIPArchitecture.from_config(TINY_OPENCLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ImageEncoder(arch).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so conversions are really tested
        for _, param in sorted(encoder.named_parameters()):
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return encoder


def _text_leftovers() -> dict[str, torch.Tensor]:
    """What task_vectors' ImageEncoder keeps of the text side after deleting its transformer."""
    gen = torch.Generator().manual_seed(7)
    return {
        "model.positional_embedding": torch.randn(77, 32, generator=gen),
        "model.token_embedding.weight": torch.randn(64, 32, generator=gen),
        "model.ln_final.weight": torch.ones(32),
        "model.ln_final.bias": torch.zeros(32),
        "model.text_projection": torch.randn(32, 16, generator=gen),
        "model.logit_scale": torch.tensor(4.6052),
    }


def _save_expert(encoder, path: Path, fmt: str) -> None:
    from safetensors.torch import save_file

    from fusion_bench.models.openclip_checkpoints import save_image_encoder

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    if fmt == "pt":
        torch.save({**state, **_text_leftovers()}, path)
    elif fmt == "safetensors":
        save_file({k.removeprefix("model."): v for k, v in state.items()}, str(path))
    else:
        save_image_encoder(encoder, path)


@torch.no_grad()
def _class_mean_head(encoder, dataset_dir: Path):
    import datasets

    from fusion_bench.models.openclip_vision import ClassificationHead

    train = datasets.load_from_disk(str(dataset_dir))["train"]
    transform = encoder.val_preprocess
    pixels = torch.stack([transform(row["image"].convert("RGB")) for row in train])  # (N, 3, H, W)
    feats = F.normalize(encoder(pixels), dim=-1)  # (N, D)
    labels = torch.tensor(train["label"])
    num_classes = train.features["label"].num_classes
    means = torch.stack([feats[labels == c].mean(dim=0) for c in range(num_classes)])  # (C, D)
    return ClassificationHead(True, _HEAD_SCALE * F.normalize(means, dim=-1))


def _build_into(tmp: Path, datasets: Mapping[str, Path], seed: int) -> None:
    from fusion_bench.models.openclip_checkpoints import save_classification_head

    paths = _layout(tmp, datasets)
    base = tiny_openclip_encoder(seed)
    _save_expert(base, paths.pretrained, "pt")
    for i, task in enumerate(datasets):
        expert = tiny_openclip_encoder(seed)
        _perturb_(expert, seed + 1 + i, 0.05)
        _save_expert(expert, paths.finetuned[task], _FORMATS[i % len(_FORMATS)])
        save_classification_head(_class_mean_head(base, paths.datasets[task]), paths.heads[task])


def build_tiny_openclip_example(
    root: str | Path, *, datasets: Mapping[str, str | Path], seed: int = 0
) -> TinyOpenCLIPExample:
    """Build (once) the tiny OpenCLIP example under ``root`` for ``datasets`` (task -> ``DatasetDict`` folder).

    A complete example with the same marker is returned as is; else it is built in a temporary
    sibling folder and renamed into place.
    """
    root = Path(root).expanduser().absolute()
    datasets = {t: Path(p) for t, p in datasets.items()}
    marker = {"format": FORMAT_VERSION, "seed": seed, "datasets": {t: str(p) for t, p in datasets.items()}}
    build_once(root, marker, lambda tmp: _build_into(tmp, datasets, seed))
    return _layout(root, datasets)
