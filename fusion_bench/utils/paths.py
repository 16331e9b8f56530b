"""Two path conventions shared by every component: optional path options and the cache root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError

__all__ = ["NO_PATH_VALUES", "optional_path", "cache_root"]

NO_PATH_VALUES = (None, False, "", "null", "none", "false", "False")  # what "no path" may be written as


def optional_path(value: Any, what: str) -> str | None:
    """A path option: the path as a string, or None for null/false/"" (and their spellings in YAML strings).

    Args:
        value: the option's value.
        what: how the message names the option (e.g. ``"merged_model_save_path"``,
            ``"clip_weight_ensembling_moe: option 'checkpoint'"``).

    Raises:
        ConfigError: ``value`` is neither a path nor one of :data:`NO_PATH_VALUES`.
    """
    if value in NO_PATH_VALUES:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path, or null/false for none; got {value!r}")
    return str(value)


def cache_root() -> Path:
    """``$FUSION_BENCH_CACHE_DIR`` (default ``~/.cache/fusion_bench``), user-expanded: where generated data,
    built examples and cached heads live."""
    return Path(os.environ.get("FUSION_BENCH_CACHE_DIR", "~/.cache/fusion_bench")).expanduser()
