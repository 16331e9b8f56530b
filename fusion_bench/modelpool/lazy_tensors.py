"""Per-tensor access to checkpoints, so merges can stream one tensor per model at a time.

A :class:`TensorSource` maps *canonical* keys (the model family's own naming, e.g. a CLIP
vision encoder's ``encoder.layers.0.mlp.fc1.weight``) to tensors, reading each tensor from
disk only when asked (``safetensors.safe_open``). Key renaming between checkpoint layouts
(``vision_model.`` prefixes of transformers 4) happens here, at the boundary.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
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
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path, *, what: str) -> dict[str, _Entry]:
    """Parse a safetensors header: ``{key: _Entry}`` (absolute offsets)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise ModelLoadError(f"{what}: cannot read safetensors file {str(path)!r} ({err})") from None
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ModelLoadError(f"{what}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        entries[key] = _Entry(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


class SafetensorsSource:
    """Tensors of one model spread over one or more safetensors files.

    Tensors are read with positioned reads (``os.pread``) into fresh buffers rather than
    through a memory map, so pages of the checkpoint files never count towards this
    process's resident memory: streaming N models holds one tensor per model, not N
    mapped files.

    Args:
        files: the checkpoint's files.
        rename: maps the raw keys of the files to ``{canonical_key: raw_key}``
            (dropping keys the model family does not use).
        what: names the model in error messages.
    """

    def __init__(self, files: Iterable[Path], *, rename: Callable[[list[str]], Mapping[str, str]], what: str):
        self.what = what
        raw: dict[str, _Entry] = {}
        for path in files:
            raw.update(_read_header(Path(path), what=what))
        self._map = {canon: raw[key] for canon, key in rename(sorted(raw)).items()}

    def keys(self) -> list[str]:
        return list(self._map)

    def _lookup(self, key: str) -> _Entry:
        try:
            return self._map[key]
        except KeyError:
            raise ModelLoadError(f"{self.what}: no tensor {key!r} in the checkpoint") from None

    def get(self, key: str) -> torch.Tensor:
        entry = self._lookup(key)
        raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)  # not zero-filled
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            view, done = memoryview(raw.numpy()), 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], entry.start + done)
                if n <= 0:
                    raise ModelLoadError(f"{self.what}: file {str(entry.path)!r} is truncated at tensor {key!r}")
                done += n
        finally:
            os.close(fd)
        return raw.view(entry.dtype).reshape(entry.shape)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self._lookup(key)
        return entry.shape, entry.dtype


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
