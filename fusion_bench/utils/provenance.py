"""What a report needs to be reproduced: package versions, checkpoint hashes, resource use.

Checkpoint files are identified without reading them whole by default:

* a file in the Hugging Face cache (``.../snapshots/<commit>/<file>`` linking to ``blobs/<sha256>``)
  gives its revision from the path and its full sha256 from the blob's name (LFS files), free;
* any other file gets a **sampled** fingerprint: sha256 over its size, its first MiB (a
  safetensors header with every tensor's name, dtype, shape and offset) and 16 blocks of
  64 KiB spread evenly over the rest, ending with the last block - about 2 MiB read per file,
  which tells apart any two fine-tuned models (all their weights differ) and catches
  truncation; ``mode="full"`` hashes every byte instead.
"""

from __future__ import annotations

import hashlib
import platform
import re
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

__all__ = ["HASH_MODES", "PACKAGES", "SAMPLED_HASH", "file_fingerprint", "package_versions", "peak_memory"]

PACKAGES = (
    "torch",
    "transformers",
    "lightning",
    "hydra-core",
    "omegaconf",
    "datasets",
    "safetensors",
    "huggingface_hub",
    "tokenizers",
    "numpy",
)
HASH_MODES = ("sampled", "full")
SAMPLED_HASH = "sha256 of size + first 1 MiB + 16 evenly spaced 64 KiB blocks (ending with the last)"
_HEAD, _BLOCK, _NUM_BLOCKS = 1 << 20, 1 << 16, 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def package_versions() -> dict[str, str | None]:
    """Python's and each of :data:`PACKAGES`' installed version (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _sampled_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(_HEAD))
        if size > _HEAD:
            last = max(size - _BLOCK, _HEAD)
            for i in range(_NUM_BLOCKS):
                f.seek(_HEAD + (last - _HEAD) * (i + 1) // _NUM_BLOCKS)
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _full_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache_facts(path: Path) -> dict[str, str]:
    """``revision`` (the snapshot's commit) and ``sha256`` (an LFS blob's name) of a hub-cache file."""
    facts: dict[str, str] = {}
    parts = path.parts
    if "snapshots" in parts[:-2]:  # .../snapshots/<commit>/<file>
        last = len(parts) - 1 - parts[::-1].index("snapshots")
        facts["revision"] = parts[last + 1]
    if path.is_symlink():
        blob = path.resolve().name
        if _HEX64.match(blob):
            facts["sha256"] = blob
    return facts


def file_fingerprint(path: str | Path, *, mode: Literal["sampled", "full"] = "sampled") -> dict[str, Any]:
    """Identify one checkpoint file (see the module docstring).

    Args:
        path: the file.
        mode: ``"sampled"`` (about 2 MiB read) or ``"full"`` (sha256 of every byte).

    Returns:
        ``{"file", "size", "sha256" | "sampled_sha256", "revision"?}``.
    """
    path = Path(path)
    size = path.stat().st_size
    out: dict[str, Any] = {"file": str(path), "size": size, **_hub_cache_facts(path)}
    if "sha256" not in out:
        key = "sha256" if mode == "full" else "sampled_sha256"
        out[key] = _full_sha256(path) if mode == "full" else _sampled_sha256(path, size)
    return out


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory (MiB) and, where CUDA was used, its peak allocated CUDA memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return out
