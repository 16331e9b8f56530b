"""Per-tensor access to checkpoints, so merges can stream one tensor per model at a time.

A :class:`TensorSource` maps *canonical* keys (the model family's own naming, e.g. a CLIP
vision encoder's ``encoder.layers.0.mlp.fc1.weight``) to tensors, reading each tensor from
disk only when asked (``safetensors.safe_open``). Key renaming between checkpoint layouts
(``vision_model.`` prefixes of transformers 4) happens here, at the boundary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

import torch

from fusion_bench.errors import ModelLoadError

__all__ = ["TensorSource", "SafetensorsSource", "StateDictSource", "safetensors_files_in"]


class TensorSource(Protocol):
    """Read-only, lazily loaded ``{key: tensor}``."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]: ...


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def safetensors_files_in(directory: Path) -> list[Path] | None:
    """The safetensors files of a ``save_pretrained`` folder (single or sharded), or None."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    return None


class SafetensorsSource:
    """Tensors of one model spread over one or more safetensors files.

    Args:
        files: the checkpoint's files.
        rename: maps the raw keys of the files to ``{canonical_key: raw_key}``
            (dropping keys the model family does not use).
        what: names the model in error messages.
    """

    def __init__(self, files: Iterable[Path], *, rename: Callable[[list[str]], Mapping[str, str]], what: str):
        from safetensors import safe_open

        self.what = what
        self._handles = []
        raw_to_handle = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:
                raise ModelLoadError(f"{what}: cannot read safetensors file {str(path)!r} ({err})") from None
            self._handles.append(handle)
            for key in handle.keys():
                raw_to_handle[key] = handle
        self._map = {canon: (raw_to_handle[raw], raw) for canon, raw in rename(sorted(raw_to_handle)).items()}

    def keys(self) -> list[str]:
        return list(self._map)

    def _lookup(self, key: str):
        try:
            return self._map[key]
        except KeyError:
            raise ModelLoadError(f"{self.what}: no tensor {key!r} in the checkpoint") from None

    def get(self, key: str) -> torch.Tensor:
        handle, raw = self._lookup(key)
        return handle.get_tensor(raw)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        handle, raw = self._lookup(key)
        sl = handle.get_slice(raw)
        return tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()]


class StateDictSource:
    """A :class:`TensorSource` over an in-memory state dict (models without safetensors files)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], *, what: str):
        self._sd = dict(state_dict)
        self.what = what

    def keys(self) -> list[str]:
        return list(self._sd)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._sd[key]
        except KeyError:
            raise ModelLoadError(f"{self.what}: no tensor {key!r} in the model") from None

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.get(key)
        return tuple(t.shape), t.dtype
