"""Reading and writing OpenCLIP image encoders and classification heads.

Encoder checkpoints:

* a folder written by :func:`save_image_encoder`: ``open_clip_config.json`` (the architecture)
  and ``model.safetensors`` (``model.visual.*`` tensors): read per tensor, no pickle;
* a state dict file (``.safetensors``, or a ``torch.save`` d dict read with ``weights_only=True``)
  in any layout :func:`~fusion_bench.models.openclip_vision.canonical_openclip_keys` accepts;
* a pickle (task_vectors' ``finetuned.pt`` / ``zeroshot.pt``: whole objects): only with
  ``allow_pickle``; its architecture is read off the unpickled tower.

Head checkpoints: a state dict ``{weight (C, D), bias? (C,)}`` (safetensors metadata
``normalize``), or a pickled task_vectors ``ClassificationHead`` (``allow_pickle``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError
from fusion_bench.models.openclip_vision import (
    ClassificationHead,
    ImageEncoder,
    OpenCLIPArchitecture,
    canonical_openclip_keys,
    infer_architecture,
    task_vectors_redirect,
)
from fusion_bench.models.torch_files import PickleRequiredError, load_pickle_file, load_state_dict_file
from fusion_bench.utils.io import atomic_directory, atomic_write

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "is_encoder_folder",
    "folder_architecture",
    "read_encoder_checkpoint",
    "encoder_state_from_object",
    "save_image_encoder",
    "load_classification_head",
    "save_classification_head",
]

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"


def is_encoder_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_image_encoder`."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def folder_architecture(path: Path, *, what: str) -> OpenCLIPArchitecture:
    """The architecture recorded in an encoder folder."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{what}: cannot read {str(path / CONFIG_FILE)!r} ({err})") from None
    return OpenCLIPArchitecture.from_config(config, what=what)


def _canonical(state: Mapping[str, torch.Tensor], *, what: str, location: str) -> dict[str, torch.Tensor]:
    mapping = canonical_openclip_keys(sorted(state))
    if not mapping:
        raise ModelLoadError(
            f"{what}: {location!r} holds no OpenCLIP vision tower (keys like 'model.visual.conv1.weight' or "
            f"'visual.conv1.weight'); first keys: {sorted(state)[:3]}"
        )
    return {canon: state[raw] for canon, raw in mapping.items()}


def encoder_state_from_object(
    obj: Any, *, what: str, location: str
) -> tuple[dict[str, torch.Tensor], OpenCLIPArchitecture | None]:
    """``(model.visual.* tensors, architecture or None)`` of an unpickled checkpoint object.

    Accepts a task_vectors ``ImageEncoder`` (``.model.visual``), an open_clip ``CLIP``
    (``.visual``), a bare tower, or a state dict.
    """
    if isinstance(obj, Mapping):
        return _canonical(obj, what=what, location=location), None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{what}: {location!r} holds a {type(obj).__name__}, not an OpenCLIP image encoder")
    visual = getattr(getattr(obj, "model", None), "visual", None)  # task_vectors ImageEncoder
    if visual is None:
        visual = getattr(obj, "visual", obj)  # an open_clip CLIP, or the tower itself
    state = {k: v.detach() for k, v in visual.state_dict().items()}
    return _canonical(state, what=what, location=location), infer_architecture(visual, what=f"{what} ({location})")


def read_encoder_checkpoint(
    path: Path, *, what: str, allow_pickle: bool
) -> tuple[dict[str, torch.Tensor], OpenCLIPArchitecture | None]:
    """``(model.visual.* tensors, architecture if the file records one)`` of an encoder file.

    The file is read as a state dict first (safetensors, or ``torch.load(weights_only=True)``);
    only if it turns out to pickle Python objects, and ``allow_pickle`` is set, is it unpickled.

    Args:
        path: a state dict file or a pickle.
        what: names the model in messages.
        allow_pickle: the user opted in to unpickling.

    Raises:
        PickleRequiredError: the file is a pickle and ``allow_pickle`` is false.
    """
    try:
        return _canonical(load_state_dict_file(path, what=what), what=what, location=str(path)), None
    except PickleRequiredError:
        if not allow_pickle:
            raise
    obj = load_pickle_file(path, what=what, redirect=task_vectors_redirect)
    return encoder_state_from_object(obj, what=what, location=str(path))


def save_image_encoder(encoder: ImageEncoder, path: str | Path, *, description: str = "") -> Path:
    """Save ``encoder`` atomically as a folder: architecture JSON + ``model.safetensors`` (+ ``README.md``)."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(encoder.architecture.to_config(), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "README.md").write_text(description or "OpenCLIP image encoder saved by FusionBench.\n")
    return Path(path)


def _head_from_state(state: Mapping[str, torch.Tensor], normalize: bool, *, what: str) -> ClassificationHead:
    weight = state.get("weight")
    if weight is None or weight.ndim != 2 or set(state) - {"weight", "bias"}:
        raise ModelLoadError(
            f"{what}: a head state dict needs 'weight' (C, D) and optionally 'bias' (C,); got {sorted(state)}"
        )
    return ClassificationHead(normalize, weight, state.get("bias"))


def _read_head_file(path: Path, *, what: str, allow_pickle: bool, normalize: bool | None) -> ClassificationHead:
    try:
        state = load_state_dict_file(path, what=what)
    except PickleRequiredError:
        if not allow_pickle:
            raise
        obj = load_pickle_file(path, what=what, redirect=task_vectors_redirect)
        if not isinstance(obj, nn.Module) or not isinstance(getattr(obj, "weight", None), torch.Tensor):
            raise ModelLoadError(
                f"{what}: {str(path)!r} holds a {type(obj).__name__}, not a classification head"
            ) from None
        flag = getattr(obj, "normalize", True) if normalize is None else normalize
        return ClassificationHead(flag, obj.weight.detach(), getattr(obj, "bias", None))
    if normalize is None:
        normalize = _safetensors_flag(path)
    return _head_from_state(state, normalize, what=what)


def _safetensors_flag(path: Path) -> bool:
    if not str(path).endswith(".safetensors"):
        return True
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("normalize", "true") != "false"


def load_classification_head(
    cfg: Any, *, what: str, allow_pickle: bool = False, base_dir: str | Path | None = None
) -> ClassificationHead:
    """A classification head from a path, ``{path, normalize?}``, a ``_target_`` config or a module.

    Args:
        cfg: the head's entry; relative paths are taken from ``base_dir``.
        what: names the head in messages.
        allow_pickle: allow unpickling task_vectors' ``head_<Task>.pt``.
        base_dir: the folder relative paths start from (None: the working directory).
    """
    from fusion_bench.utils.instantiate import call_with_options, resolve_target, to_container

    cfg = to_container(cfg)
    if isinstance(cfg, nn.Module):
        head = cfg
    elif isinstance(cfg, Mapping) and "_target_" in cfg:
        opts = dict(cfg)
        head = call_with_options(resolve_target(opts.pop("_target_"), what=what), opts, what=what)
    else:
        entry = {"path": cfg} if isinstance(cfg, (str, Path)) else dict(cfg) if isinstance(cfg, Mapping) else {}
        if not entry.get("path") or set(entry) - {"path", "normalize"}:
            raise ModelLoadError(f"{what}: expected a path, {{path, normalize}} or a _target_ config; got {cfg!r}")
        path = Path(str(entry["path"])).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir).expanduser() / path
        head = _read_head_file(path, what=what, allow_pickle=allow_pickle, normalize=entry.get("normalize"))
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ModelLoadError(
            f"{what}: expected a classification head (a module with a (C, D) weight), got {type(head).__name__}"
        )
    return head.eval()


def save_classification_head(head: ClassificationHead, path: str | Path) -> Path:
    """Save a head as safetensors ``{weight, bias}`` with its ``normalize`` flag in the metadata, atomically."""
    from safetensors.torch import save

    state = {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()}
    with atomic_write(path, "wb") as f:
        f.write(save(state, metadata={"normalize": "true" if head.normalize else "false"}))
    return Path(path)
