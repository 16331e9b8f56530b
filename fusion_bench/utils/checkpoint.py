"""Resumable training checkpoints: tensors, optimiser state, step and RNG states, written atomically.

Checkpoints hold only tensors, numbers, strings and containers of them, so they load with
``torch.load(weights_only=True)``: reading one never runs code. A checkpoint records what it
belongs to (``meta``: method, pool's model names, shapes), and :func:`load_checkpoint` refuses
one made for something else, naming the mismatch.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.utils.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU) generators, as tensors and numbers."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: str | Path, state: Mapping[str, Any], *, meta: Mapping[str, Any]) -> Path:
    """Write ``{"meta": meta, **state}`` to ``path`` atomically (temporary file, then rename).

    Args:
        path: the file.
        state: tensors, optimiser ``state_dict()`` s, the step, ``rng_state()``...
        meta: what the checkpoint belongs to (compared on load).

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_write(path, "wb") as f:
        torch.save({"meta": dict(meta), **state}, f)
    return Path(path)


def load_checkpoint(
    path: str | Path, *, expect: Mapping[str, Any] | None = None, what: str = "checkpoint"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only: no code runs).

    Args:
        path: the file.
        expect: entries ``meta`` must have (e.g. the method and the pool's model names).
        what: names the checkpoint in messages (e.g. ``"adamerging: weights"``).

    Raises:
        ModelLoadError: the file is missing or not such a checkpoint.
        ConfigError: ``meta`` differs from ``expect`` (naming the first differing entry).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{what}: no file {str(path)!r}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, arbitrary objects refused by weights_only
        raise ModelLoadError(
            f"{what}: {str(path)!r} is not a FusionBench checkpoint ({err.__class__.__name__})"
        ) from None
    if not isinstance(data, dict) or "meta" not in data:
        raise ModelLoadError(f"{what}: {str(path)!r} is not a FusionBench checkpoint (no 'meta' entry)")
    for key, value in (expect or {}).items():
        got = data["meta"].get(key)
        if got != value:
            raise ConfigError(f"{what}: {str(path)!r} was made for {key} {got!r}, not {value!r}")
    return data
